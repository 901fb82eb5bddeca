# The demo (`make demo`): creates tensors on the best available device,
# chains operations on it without host round trips, checks the result
# against a host computation, and prints a small benchmark table.
alias Mambex.{Bench, Ops, Tensor}

device = Mambex.default_device()
IO.puts("Mambex demo on #{inspect(device)} (#{Mambex.device_name(device)}); CUDA: #{Mambex.cuda_status()}")

# A chain: x -> (x * 2 + bias) -> exp -> mean over the last axis, on the device.
x = Tensor.random_normal({4, 60, 8}, seed: 42, device: device)
bias = Tensor.iota({8}, device: device) |> Ops.divide(10.0)
y = x |> Ops.multiply(2.0) |> Ops.add(bias) |> Ops.exp() |> Ops.mean(axis: -1)
IO.inspect(y, label: "mean(exp(2x + bias), axis: -1)")

# Check against the host.
xs = Tensor.to_flat_list(x)
ref =
  xs
  |> Enum.chunk_every(8)
  |> Enum.map(fn row ->
    row |> Enum.with_index() |> Enum.map(fn {v, i} -> :math.exp(2 * v + i / 10) end) |> Enum.sum() |> Kernel./(8)
  end)

err =
  Enum.zip(Tensor.to_flat_list(y), ref)
  |> Enum.map(fn {a, b} -> abs(a - b) / max(abs(b), 1.0e-30) end)
  |> Enum.max()

IO.puts("max relative error against the host: #{:erlang.float_to_binary(err, decimals: 8)}")

rows =
  for {name, shape} <- [{"add 1 KiB", {256}}, {"add 4 MiB", {1_048_576}}, {"add 64 MiB", {16_777_216}}] do
    a = Tensor.random_uniform(shape, seed: 1, device: device)
    b = Tensor.random_uniform(shape, seed: 2, device: device)
    s = Bench.wall_time(device, fn -> Ops.add(a, b) end, runs: 21)
    bytes = 3 * Tensor.byte_size_of(a)
    {name, s.median, bytes / s.median / 1.0e3}
  end

chain =
  Bench.wall_time(device, fn ->
    Enum.reduce(1..1000, Tensor.ones({256}, device: device), fn _, acc -> Ops.add(acc, 1.0) end)
  end, runs: 11)

IO.puts("\n| op | median µs | GB/s |\n|---|---|---|")
for {name, us, gbs} <- rows, do: IO.puts("| #{name} | #{Float.round(us, 1)} | #{Float.round(gbs, 2)} |")
IO.puts("| 1000 chained adds, per op | #{Float.round(chain.median / 1000, 2)} | — |")
IO.puts("\nmemory: #{inspect(Mambex.memory_stats(device))}")
