defmodule Mambex.Loss do
  @moduledoc """
  Training losses with their gradients: softmax cross-entropy and mean
  squared error. Each call computes the loss and (unless `grad: false`) the
  gradient of the loss with respect to its first argument in one fused pass.

  ## Cross-entropy

  For logits `x` of shape `{..., C}` (the leading axes are flattened into
  rows `r`) and `{:s, 32}` targets `t` of the leading shape:

      l_r     = w[t_r] * (logsumexp(x_r) - x_r[t_r])        (w = 1 without :weights)
      loss    = scale * Σ_r l_r / den
      dlogits = scale * w[t_r] * (softmax(x_r) - onehot(t_r)) / den

  where `den` is the sum of `w[t_r]` over the rows that are not ignored for
  `reduction: :mean` (the weighted mean; the number of such rows without
  weights) and 1 for `:sum`. When `den` is 0 (for instance every row is
  ignored) the loss and the gradient are 0.

  A row whose target equals `:ignore_index` contributes nothing: its loss
  term is 0 and its gradient row is exactly 0. Any other target outside
  `0..C-1` cannot be caught on the host (the targets may live on the GPU, and
  reading them would synchronise): it makes the loss NaN and that row's
  gradient NaN, never an out-of-bounds read. Such a row counts 1 in the
  mean's denominator, so the other rows' gradients stay finite.

  ## MSE

      loss  = scale * Σ_i (pred_i - target_i)^2 / n       (n = number of elements; / 1 for :sum)
      dpred = scale * 2 * (pred_i - target_i) / n

  With `n = 0` the loss is 0.

  `scale` multiplies the loss and the gradient alike, e.g. `1 / micro_batches`
  when gradients are accumulated over micro-batches.

  ## Shapes and types

  | argument | shape | type |
  |---|---|---|
  | `logits`, `dlogits` | `{..., C}`, `C >= 1` (rank >= 1) | io |
  | `targets` | the leading shape of `logits` (`{}` for rank-1 logits) | `{:s, 32}` |
  | `:weights` | `{C}` | param |
  | `pred`, `target`, `dpred` | any shape, the same | io |
  | loss | `{}` (a scalar) | param |

  On the CPU, io is `{:f, 32}` or `{:f, 64}` and param is the same type. On
  CUDA, io is `{:f, 32}` or `{:bf, 16}` and param is `{:f, 32}`. All tensors
  must be on one device. Wrong shapes, types or devices, freed tensors and
  unknown or malformed options raise `ArgumentError` naming the argument.

  ## The loss is a device scalar

  The loss is a rank-0 tensor on the device of the inputs, written by the
  same kernels as the gradient. Nothing waits for it: chaining it into
  further ops (summing micro-batch losses, scaling) stays on the device's
  queue. Reading it on the host (`Mambex.Tensor.to_flat_list/1`,
  `Mambex.Tensor.to_binary/1`) waits for every op enqueued before, so read
  it once every few steps rather than after every call.

  ## Numerics

  Math is done in fp32 (fp64 for f64 io) whatever the io type; the
  log-sum-exp subtracts the row maximum, so logits of any magnitude (±1e4
  and beyond) give finite losses. Every reduction runs in a fixed order
  (per-row sums with a fixed lane layout, per-block or per-chunk partial sums
  added in index order, no float atomics): results are bit-identical from
  run to run on one device, whatever the number of threads. Against a
  float64 reference the relative error is below 1e-5 for f32 losses and
  1e-4 for f32 gradients, about 1e-2 with bf16 io. The CPU and CUDA results
  agree within those tolerances, not bit for bit.

  ## Performance

  On CUDA the cross-entropy is one kernel (two when the mean's denominator
  depends on the data, i.e. with `:weights` or `:ignore_index` and
  `reduction: :mean`: a tiny kernel sums the target weights first) that reads
  the logits once and writes the gradient once; a warp holds a row in
  registers for up to 1024 classes, a block streams longer rows (large
  vocabularies) with an online maximum. The last block to finish adds the
  per-block partial losses in a fixed order. MSE is one grid-stride kernel
  with the same reduction. On the CPU the work is split into fixed chunks of
  rows run on the thread pool.

  Measured on an H200 (device time, f32 io, `bench/cuda/loss_harness.c`,
  bench/results/loss_harness_*.txt): 15,360 x 64 logits with the gradient
  9.4 µs (13.9 µs with weights and ignore_index: two launches); 15,360 x 1024
  52 µs (57% of the 4.2 TB/s floor); 256 x 50,257 49 µs (50%); MSE on
  15,360 x 256 17 µs (67%). On the 2-core CI machine the CPU takes about
  2.4 ms for 15,360 x 64 and 20 ms for 15,360 x 1024.
  """

  alias Mambex.NIF
  alias Mambex.Tensor

  @xent_opts [:weights, :ignore_index, reduction: :mean, scale: 1.0, grad: true]
  @mse_opts [reduction: :mean, scale: 1.0, grad: true]

  @doc """
  Softmax cross-entropy of `logits` (`{..., C}`, io type) against class
  indices `targets` (`{:s, 32}`, the leading shape of `logits`).

  Options:

    * `:reduction` — `:mean` (default; weighted mean over the rows not
      ignored) or `:sum`
    * `:ignore_index` — an integer: rows with this target contribute nothing
    * `:weights` — `{C}` per-class weights (param type)
    * `:scale` — a number multiplying the loss and the gradient (default 1.0)
    * `:grad` — compute `dlogits` (default `true`)

  Returns `{loss, dlogits}`: `loss` is a `{}` device scalar (param type),
  `dlogits` the gradient of `loss` with respect to `logits` (the shape and
  type of `logits`), or `nil` with `grad: false`.
  """
  @spec cross_entropy(Tensor.t(), Tensor.t(), keyword()) :: {Tensor.t(), Tensor.t() | nil}
  def cross_entropy(logits, targets, opts \\ []) do
    opts = validate_opts!(opts, @xent_opts, "cross_entropy")

    Mambex.retry_oom(fn ->
      NIF.cross_entropy(
        logits,
        targets,
        opts[:weights],
        opts[:reduction],
        opts[:ignore_index],
        opts[:scale],
        opts[:grad]
      )
    end)
  end

  @doc """
  Squared error of `pred` against `target` (one shape, io type).

  Options:

    * `:reduction` — `:mean` (default; divided by the number of elements) or `:sum`
    * `:scale` — a number multiplying the loss and the gradient (default 1.0)
    * `:grad` — compute `dpred` (default `true`)

  Returns `{loss, dpred}`: `loss` is a `{}` device scalar (param type),
  `dpred` the gradient of `loss` with respect to `pred`, or `nil` with
  `grad: false`.
  """
  @spec mse(Tensor.t(), Tensor.t(), keyword()) :: {Tensor.t(), Tensor.t() | nil}
  def mse(pred, target, opts \\ []) do
    opts = validate_opts!(opts, @mse_opts, "mse")

    Mambex.retry_oom(fn ->
      NIF.mse(pred, target, opts[:reduction], opts[:scale], opts[:grad])
    end)
  end

  defp validate_opts!(opts, allowed, fun) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError, "#{fun}: options must be a keyword list, got: #{inspect(opts, limit: 5)}"
    end

    opts =
      try do
        Keyword.validate!(opts, allowed)
      rescue
        e in ArgumentError ->
          reraise ArgumentError, "#{fun}: #{Exception.message(e)}", __STACKTRACE__
      end

    check!(fun, :reduction, opts[:reduction], &(&1 in [:mean, :sum]), ":mean or :sum")
    check!(fun, :scale, opts[:scale], &is_number/1, "a number")
    check!(fun, :grad, opts[:grad], &is_boolean/1, "true or false")

    if Keyword.has_key?(opts, :ignore_index) do
      check!(fun, :ignore_index, opts[:ignore_index], &is_integer/1, "an integer")
    end

    if Keyword.has_key?(opts, :weights) do
      check!(fun, :weights, opts[:weights], &match?(%Tensor{}, &1), "a Mambex.Tensor")
    end

    opts
  end

  defp check!(fun, key, value, ok?, what) do
    unless ok?.(value) do
      raise ArgumentError, "#{fun}: #{key} must be #{what}, got: #{inspect(value, limit: 5)}"
    end
  end
end
