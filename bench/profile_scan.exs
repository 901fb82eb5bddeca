# Runs the CUDA scan forward and backward a few times at two shapes, for a
# profiler (`ncu --target-processes all mix run bench/profile_scan.exs`).
alias Mambex.{Scan, Tensor}
dev = {:cuda, 0}

for {b, l} <- [{1, 60}, {256, 60}] do
  d = 512
  n = 16
  u = Tensor.random_normal({b, l, d}, seed: 1, device: dev)
  delta = Tensor.random_normal({b, l, d}, seed: 2, device: dev, std: 0.5)
  a = Tensor.random_uniform({d, n}, seed: 3, device: dev, min: -2.0, max: -0.1)
  bm = Tensor.random_normal({b, l, n}, seed: 4, device: dev)
  cm = Tensor.random_normal({b, l, n}, seed: 5, device: dev)
  z = Tensor.random_normal({b, l, d}, seed: 6, device: dev)
  dd = Tensor.random_normal({d}, seed: 7, device: dev)
  db = Tensor.random_normal({d}, seed: 8, device: dev)

  for _ <- 1..2 do
    {out, _h, ctx} = Scan.forward(u, delta, a, bm, cm, d: dd, z: z, delta_bias: db)
    _grads = Scan.backward(ctx, out)
    Mambex.sync(dev)
  end
end
IO.puts("profiled")
