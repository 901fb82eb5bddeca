defmodule Mambex.Conv1d do
  @moduledoc """
  Causal depthwise 1-D convolution along the time axis (the short
  convolution of a Mamba block), forward and backward, with an optional
  bias, a fused SiLU and a carried state.

  ## Semantics

  For batch `b`, step `t`, channel `c` and kernel width `W` (`K = W - 1`):

      xpad[b, s, c] = x[b, s, c]                  for 0 <= s < L
                    = initial_state[b, c, K + s]  for -K <= s < 0 (zeros when not given)
      pre[b, t, c]  = bias[c] + Σ_{j < W} weight[c, j] · xpad[b, t + j - K, c]
      out[b, t, c]  = silu(pre) = pre · sigmoid(pre)     (silu: true)
                    = pre                                 (silu: false)

  so `weight[c, W - 1]` multiplies the current input and `weight[c, 0]` the
  oldest. The final state `final_state[b, c, k] = xpad[b, L - K + k, c]`
  holds the last `K` inputs of the padded sequence, oldest first (the initial
  state when `L = 0`), so a sequence can be run in pieces: running the first
  part, then the rest with `initial_state:` the first part's final state,
  gives the outputs of one call; passing the second part's `:initial_state`
  gradient back as the first part's `d_final_state:` gives its gradients.

  The backward saves nothing but the inputs: with SiLU it recomputes `pre`
  from `x`.

  ## Shapes and types

  | argument | shape | type |
  |---|---|---|
  | `x`, `out`, `d_out`, gradient of `x` | `{batch, length, channels}` = `{B, L, C}` | io |
  | `weight` and its gradient | `{C, W}`, `1 <= W <= 8` | param |
  | `:bias` and its gradient | `{C}` | param |
  | `:initial_state`, final state, `:d_final_state`, gradient of the initial state | `{B, C, W - 1}` | param |

  On the CPU, io is `{:f, 32}` or `{:f, 64}` and param is the same type. On
  CUDA, io is `{:f, 32}` or `{:bf, 16}` and param is `{:f, 32}`. All tensors
  must be on one device. `B`, `L` or `C` may be 0. Wrong shapes, types or
  devices, a width outside 1..8, freed tensors and unknown options raise
  `ArgumentError` naming the argument.

  ## Numerics

  Everything is computed in fp32 (fp64 for f64) whatever the io type. The
  sums over batch and time of the weight and bias gradients run in a fixed
  order that depends only on the shapes (per-tile partial sums, then a
  fixed-order final sum; no atomics), so results are bit-identical from run
  to run on one device and, on the CPU, whatever the number of threads. CPU
  and CUDA results differ only by rounding. Against a float64 reference the
  relative error is below 1e-5 for f32 outputs, 1e-4 for f32 gradients and
  1e-2 with bf16 io.

  ## Performance

  CUDA: one kernel for the forward; one kernel plus a small fixed-order
  reduce for the backward. Each thread owns 4 channels (one 16-byte f32 or
  8-byte bf16 access when `C` is a multiple of 4 and the tensors are
  aligned, else one channel) and walks a tile of consecutive steps keeping
  the last `W` inputs in registers; the forward moves `x` in and `out` out
  once, the backward reads `x` and `d_out` and writes the input gradient once.
  CPU: rows of channels, threaded over (batch, time chunk) on the pool.
  See `bench/conv1d_bench_test.exs`.
  """

  alias Mambex.NIF
  alias Mambex.Tensor

  defmodule Context do
    @moduledoc """
    What `Mambex.Conv1d.backward/3` needs from a forward call: the inputs and
    the `silu` flag (the backward recomputes everything else). Keeping a
    context keeps these tensors alive.
    """
    @enforce_keys [:x, :weight, :silu]
    defstruct [:x, :weight, :bias, :initial_state, silu: false]

    @type t :: %__MODULE__{
            x: Tensor.t(),
            weight: Tensor.t(),
            bias: Tensor.t() | nil,
            initial_state: Tensor.t() | nil,
            silu: boolean()
          }
  end

  @type gradients :: %{
          required(:x) => Tensor.t(),
          required(:weight) => Tensor.t(),
          optional(:bias) => Tensor.t(),
          optional(:initial_state) => Tensor.t()
        }

  @doc """
  Runs the convolution. Returns `{out, final_state, context}`.

    * `x` — `{B, L, C}`, io type
    * `weight` — `{C, W}`, param type, `1 <= W <= 8`

  Options:

    * `:bias` — `{C}` (param type), added before the activation
    * `:silu` — apply SiLU to the result (default `false`)
    * `:initial_state` — `{B, C, W - 1}` (param type): the `W - 1` inputs
      before step 0, oldest first (default zeros)

  `out` is `{B, L, C}` (io type), `final_state` `{B, C, W - 1}` (param type).
  """
  @spec forward(Tensor.t(), Tensor.t(), keyword()) :: {Tensor.t(), Tensor.t(), Context.t()}
  def forward(x, weight, opts \\ []) do
    opts = validate_opts!(opts, [:bias, :initial_state, silu: false], "forward")

    ctx = %Context{
      x: x,
      weight: weight,
      bias: opts[:bias],
      initial_state: opts[:initial_state],
      silu: opts[:silu]
    }

    {out, final_state} =
      Mambex.retry_oom(fn ->
        NIF.conv1d_forward(x, weight, ctx.bias, ctx.initial_state, ctx.silu)
      end)

    {out, final_state, ctx}
  end

  @doc """
  Gradients of a convolution given the gradient of its output.

    * `context` — from `forward/3`
    * `d_out` — `{B, L, C}`, io type: the gradient of `out`

  Options:

    * `:d_final_state` — `{B, C, W - 1}` (param type): the gradient of the
      final state (default zeros), e.g. the `:initial_state` gradient of the
      next piece of a split sequence
    * `:into` — a map holding a tensor for every parameter gradient the call
      produces (`:weight` always, `:bias` when the forward had a bias,
      `:initial_state` when it had one), shaped and typed like the
      parameter: the gradients are added to them in place (gradient
      accumulation over micro-batches) and they are returned under the same
      keys. They must not share memory with the inputs.

  Returns `%{x: dx, weight: dweight}` plus `:bias` and `:initial_state`
  when those were given to `forward/3`. `dx` is always a new tensor.
  """
  @spec backward(Context.t(), Tensor.t(), keyword()) :: gradients()
  def backward(context, d_out, opts \\ [])

  def backward(%Context{} = ctx, d_out, opts) do
    opts = validate_opts!(opts, [:d_final_state, :into], "backward")
    {iw, ib, ih} = into_tensors(opts[:into], ctx)

    Mambex.retry_oom(fn ->
      NIF.conv1d_backward(
        ctx.x,
        ctx.weight,
        ctx.bias,
        ctx.initial_state,
        ctx.silu,
        d_out,
        opts[:d_final_state],
        iw,
        ib,
        ih
      )
    end)
  end

  def backward(other, _d_out, _opts) do
    raise ArgumentError,
          "conv1d_backward: context must be a Mambex.Conv1d.Context from " <>
            "Mambex.Conv1d.forward/3, got: #{inspect(other, limit: 5)}"
  end

  defp into_tensors(nil, _ctx), do: {nil, nil, nil}

  defp into_tensors(into, ctx) when is_map(into) do
    wanted =
      [:weight] ++
        if(ctx.bias, do: [:bias], else: []) ++
        if ctx.initial_state, do: [:initial_state], else: []

    keys = Map.keys(into)

    if Enum.sort(keys) != Enum.sort(wanted) do
      raise ArgumentError,
            "conv1d_backward: into must hold exactly the keys #{inspect(wanted)} " <>
              "(one per parameter gradient of this call), got: #{inspect(keys)}"
    end

    for {key, nil} <- into do
      raise ArgumentError, "conv1d_backward: into.#{key} must be a Mambex.Tensor, got: nil"
    end

    {into[:weight], into[:bias], into[:initial_state]}
  end

  defp into_tensors(other, _ctx) do
    raise ArgumentError,
          "conv1d_backward: into must be a map of tensors, got: #{inspect(other, limit: 5)}"
  end

  defp validate_opts!(opts, allowed, fun) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError,
            "conv1d_#{fun}: options must be a keyword list, got: #{inspect(opts, limit: 5)}"
    end

    try do
      Keyword.validate!(opts, allowed)
    rescue
      e in ArgumentError ->
        reraise ArgumentError, "conv1d_#{fun}: #{Exception.message(e)}", __STACKTRACE__
    end
  end
end
