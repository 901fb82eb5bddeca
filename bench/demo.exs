# The demo (`make demo`): trains a 2-layer Mamba model on the Selective
# Copying task of the Mamba paper on the best available device, entirely on
# the device (forward, cross-entropy, backward, clipping, AdamW per step),
# with a live progress line; then prints a short benchmark table.
#
# Settings: on a GPU the paper-like task (context 256, 16 tokens of 16
# symbols, d_model 64); on the CPU a smaller one (context 64, 8 tokens of 8
# symbols) that finishes in a few minutes on 2 cores. Training stops early
# once the held-out accuracy reaches DEMO_TARGET (0.99). Override with
# DEMO_STEPS, DEMO_BATCH, DEMO_EVERY (steps between reports), DEMO_TARGET;
# DEMO_CURVE=path writes the training curve as CSV.
alias Mambex.{Bench, Model, Scan, SelectiveCopying, Tensor}

device = Mambex.default_device()
gpu? = device != :cpu

IO.puts(
  "Mambex demo on #{inspect(device)} (#{Mambex.device_name(device)}); CUDA: #{Mambex.cuda_status()}"
)

{task, steps, batch} =
  if gpu?,
    do: {SelectiveCopying.config(length: 256, tokens: 16, vocab: 16), 20000, 64},
    else: {SelectiveCopying.config(length: 64, tokens: 8, vocab: 8), 1200, 32}

steps = String.to_integer(System.get_env("DEMO_STEPS", "#{steps}"))
batch = String.to_integer(System.get_env("DEMO_BATCH", "#{batch}"))

model =
  Model.new(
    features: SelectiveCopying.features(task),
    outputs: task.vocab,
    d_model: 64,
    n_layers: 2,
    seed: 1,
    device: device
  )

opt = Model.optimizer(model, lr: 1.0e-2, max_grad_norm: 1.0)
params = model.params |> Map.values() |> Enum.map(&Tensor.size/1) |> Enum.sum()

IO.puts(
  "Selective Copying: context #{task.length}, #{task.tokens} tokens of #{task.vocab} symbols; " <>
    "2-layer Mamba, d_model 64, #{params} parameters; batch #{batch}, #{steps} steps"
)

# Curriculum over the context length: stages of doubling length up to the
# task's, each trained until its held-out accuracy reaches 95 % (the last
# one until DEMO_TARGET). The model is recurrent, so what it learns on short
# contexts carries over; the paper-length task alone plateaus at chance for
# tens of thousands of steps (bench/results/demo_gpu_a7cce7f.txt).
stages =
  Stream.iterate(32, &(&1 * 2))
  |> Enum.take_while(&(&1 < task.length))
  |> Enum.map(&%{task | length: &1})
  |> Kernel.++([task])

held = fn t -> SelectiveCopying.batch(t, 256, device, :rand.seed_s(:exsss, {7, 7, t.length})) end
t0 = System.monotonic_time(:millisecond)
report_every = String.to_integer(System.get_env("DEMO_EVERY", "#{if gpu?, do: 250, else: 100}"))
# stops early once the held-out accuracy reaches this
target = String.to_float(System.get_env("DEMO_TARGET", "0.99"))

{model, _opt, _rand, curve, _stages} =
  Enum.reduce_while(1..steps, {model, opt, :rand.seed_s(:exsss, {1, 2, 3}), [], stages}, fn
    step, {m, o, r, curve, [stage | rest] = todo} ->
      {x, y, _answers, r} = SelectiveCopying.batch(stage, batch, device, r)
      {m, o, loss} = Model.train_step(m, o, x, y)

      if rem(step, report_every) == 0 or step == steps do
        # reading the loss waits for the step: the only sync in the loop
        l = hd(Tensor.to_flat_list(loss))
        {hx, _, hans, _} = held.(stage)
        acc = SelectiveCopying.accuracy(stage, elem(Model.forward(m, hx), 0), hans)
        secs = (System.monotonic_time(:millisecond) - t0) / 1000

        IO.write(
          "\rstep #{String.pad_leading("#{step}", 5)}  context #{String.pad_leading("#{stage.length}", 4)}  " <>
            "loss #{:erlang.float_to_binary(l, decimals: 4)}  " <>
            "held-out accuracy #{:erlang.float_to_binary(acc * 100, decimals: 1)}%  " <>
            "#{:erlang.float_to_binary(step / secs, decimals: 1)} steps/s   "
        )

        curve = [{step, stage.length, l, acc, secs} | curve]

        cond do
          rest == [] and acc >= target ->
            {:halt, {m, o, r, curve, []}}

          rest != [] and acc >= 0.95 ->
            IO.puts("")
            {:cont, {m, o, r, curve, rest}}

          true ->
            {:cont, {m, o, r, curve, todo}}
        end
      else
        {:cont, {m, o, r, curve, todo}}
      end
  end)

{done, len, _, final_acc, secs} = hd(curve)

IO.puts(
  "\nfinal held-out token accuracy #{Float.round(final_acc * 100, 2)}% at context #{len} " <>
    "after #{done} steps in #{Float.round(secs, 1)} s"
)

if path = System.get_env("DEMO_CURVE") do
  File.write!(
    path,
    [
      "step,context,loss,accuracy,seconds\n"
      | for({s, c, l, a, t} <- Enum.reverse(curve), do: "#{s},#{c},#{l},#{a},#{t}\n")
    ]
  )
end

# ---- a short benchmark table ---------------------------------------------
bench = fn fun, runs ->
  if gpu?,
    do: Bench.device_time(device, fun, runs: runs),
    else: Bench.wall_time(device, fun, runs: runs)
end

{sb, sl} = if gpu?, do: {256, 60}, else: {8, 60}
u = Tensor.random_uniform({sb, sl, 512}, seed: 1, min: -1.0, max: 1.0, device: device)
a = Tensor.random_uniform({512, 16}, seed: 2, min: -2.0, max: -0.1, device: device)
bc = Tensor.random_uniform({sb, sl, 16}, seed: 3, min: -1.0, max: 1.0, device: device)
scan_fwd = bench.(fn -> Scan.forward(u, u, a, bc, bc, z: u, checkpoints: false) end, 20)

big = Model.new(features: 256, outputs: 64, d_model: 256, n_layers: 2, seed: 2, device: device)

bopt = Model.optimizer(big, max_grad_norm: 1.0)
bx = Tensor.random_uniform({sb, sl, 256}, seed: 4, min: -1.0, max: 1.0, device: device)
by = Tensor.fill({sb, sl}, 3, type: {:s, 32}, device: device)

step_t =
  Bench.wall_time(device, fn -> Model.train_step(big, bopt, bx, by) end, warmup: 2, runs: 10)

IO.puts("""

| measurement (#{if gpu?, do: "device time", else: "wall time"} unless noted) | median µs |
|---|---|
| selective scan forward, B #{sb} × L #{sl} × D 512, N 16 | #{Float.round(scan_fwd.median, 1)} |
| training step, 2 layers d_model 256, B #{sb} × L #{sl} (wall, from Elixir) | #{Float.round(step_t.median, 1)} |
""")

IO.puts("memory: #{inspect(Mambex.memory_stats(device))}")
