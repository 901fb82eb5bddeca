defmodule Mambex.Norm do
  @moduledoc """
  RMSNorm and LayerNorm over the last axis, optionally fused with the
  residual add that precedes them in a pre-norm block, forward and backward.

  ## Semantics

  `x` of shape `{..., dim}` is normalised row by row over its last axis (the
  leading axes are flattened into `rows`). With a residual, the input is the
  sum `s = x + residual` (returned, so that it can carry on along the
  residual stream); otherwise `s = x`.

      RMSNorm:   y = s · rstd · weight                 rstd = 1 / sqrt(mean(s²) + eps)
      LayerNorm: y = (s − mean) · rstd · weight + bias  rstd = 1 / sqrt(var(s) + eps)

  `var` is the biased (population) variance of the row; `bias` is optional.
  `eps` defaults to `1.0e-5`.

  The backward takes the context of the forward, `dy` (the gradient of `y`)
  and, for the `add_` variants, optionally `d_sum:` (the gradient reaching
  the returned sum along the residual stream). With `g = dy · weight` and
  `x̂ = (s − mean) · rstd` (mean = 0 for RMSNorm):

      ds       = rstd · (g − mean(g) − x̂ · mean(g · x̂))     (no mean(g) term for RMSNorm)
      dx       = ds + d_sum                             (also the residual's gradient)
      d_weight = Σ_rows dy · x̂                          d_bias = Σ_rows dy

  ## Shapes and types

  | tensor | shape | type |
  |---|---|---|
  | `x`, `residual`, `y`, sum, `dy`, `:d_sum`, gradients of `x` and `residual` | `{..., dim}`, `dim >= 1` | io |
  | `weight`, `:bias` and their gradients | `{dim}` | param |
  | saved statistics (`mean`, `rstd` in the context) | `{rows}` | param |

  On the CPU io is `{:f, 32}` or `{:f, 64}` and param is the same type. On
  CUDA io is `{:f, 32}` or `{:bf, 16}` and param is `{:f, 32}`. All tensors
  must be on one device. `rows` may be 0. Wrong shapes, types, devices,
  freed tensors and unknown options raise `ArgumentError` naming the
  argument.

  ## Gradient accumulation

  `backward/3` with `into: %{weight: w_grad}` (plus `bias: b_grad` exactly
  when the forward had a bias) adds the parameter gradients into those
  tensors in place and returns them under the same keys. The input gradient
  is always a new tensor.

  ## Numerics

  Statistics and every sum are computed in fp32 (fp64 for f64 io) whatever
  the io type; with bf16 io the sum `x + residual` is rounded to bf16 first
  and the normalisation uses that rounded sum, exactly as the backward will
  see it. The LayerNorm variance is a centred second pass (no cancellation).
  The weight and bias gradients are reduced over rows in a fixed order
  (per-chunk partial sums, then the partials in order): results are
  bit-identical from run to run on one device, whatever the number of CPU
  threads. Against a float64 reference the relative error is about 1e-6 for
  f32 and below 1e-2 for bf16 io.

  ## Performance

  CUDA: one warp per row; rows whose `dim` is a multiple of 4 up to 1024
  live in registers (vector loads, warp-shuffle reductions), other sizes
  loop over the row. The backward writes per-block partial sums of the
  weight and bias gradients and a second small kernel adds them up in a
  fixed order. The CPU runs chunks of rows on the thread pool.
  """

  alias Mambex.NIF
  alias Mambex.Tensor

  @default_eps 1.0e-5

  defmodule Context do
    @moduledoc """
    What `Mambex.Norm.backward/3` needs from a forward call: `s` (the tensor
    that was normalised: `x`, or the sum `x + residual`), `weight`, `bias`
    (or nil), the per-row statistics `mean` (LayerNorm only) and `rstd`,
    the `kind` (`:rms_norm` or `:layer_norm`), `eps`, and whether the
    forward had a residual. Keeping a context keeps these tensors alive.
    """
    @enforce_keys [:kind, :s, :weight, :rstd, :eps]
    defstruct [:kind, :s, :weight, :bias, :mean, :rstd, :eps, residual?: false]

    @type t :: %__MODULE__{
            kind: :rms_norm | :layer_norm,
            s: Tensor.t(),
            weight: Tensor.t(),
            bias: Tensor.t() | nil,
            mean: Tensor.t() | nil,
            rstd: Tensor.t(),
            eps: float(),
            residual?: boolean()
          }
  end

  @type gradients :: %{
          required(:x) => Tensor.t(),
          required(:weight) => Tensor.t(),
          optional(:bias) => Tensor.t(),
          optional(:residual) => Tensor.t()
        }

  @doc """
  RMSNorm of `x` (`{..., dim}`, io type) with `weight` (`{dim}`, param type).

  Options: `:eps` (default `1.0e-5`). Returns `{y, context}`.
  """
  @spec rms_norm(Tensor.t(), Tensor.t(), keyword()) :: {Tensor.t(), Context.t()}
  def rms_norm(x, weight, opts \\ []) do
    opts = validate_opts!(opts, [eps: @default_eps], "rms_norm")
    {y, nil, ctx} = forward(:rms_norm, x, nil, weight, nil, opts[:eps])
    {y, ctx}
  end

  @doc """
  `rms_norm/3` of `x + residual`. Returns `{y, sum, context}` where `sum`
  is `x + residual` (io type), the residual stream's next value.
  """
  @spec add_rms_norm(Tensor.t(), Tensor.t(), Tensor.t(), keyword()) ::
          {Tensor.t(), Tensor.t(), Context.t()}
  def add_rms_norm(x, residual, weight, opts \\ []) do
    opts = validate_opts!(opts, [eps: @default_eps], "add_rms_norm")
    check_residual!(residual, "add_rms_norm")
    forward(:rms_norm, x, residual, weight, nil, opts[:eps])
  end

  @doc """
  LayerNorm of `x` (`{..., dim}`, io type) with `weight` (`{dim}`, param
  type).

  Options: `:bias` (`{dim}`, param type; default none), `:eps` (default
  `1.0e-5`). Returns `{y, context}`.
  """
  @spec layer_norm(Tensor.t(), Tensor.t(), keyword()) :: {Tensor.t(), Context.t()}
  def layer_norm(x, weight, opts \\ []) do
    opts = validate_opts!(opts, [:bias, eps: @default_eps], "layer_norm")
    {y, nil, ctx} = forward(:layer_norm, x, nil, weight, opts[:bias], opts[:eps])
    {y, ctx}
  end

  @doc """
  `layer_norm/3` of `x + residual`. Returns `{y, sum, context}` where `sum`
  is `x + residual` (io type).
  """
  @spec add_layer_norm(Tensor.t(), Tensor.t(), Tensor.t(), keyword()) ::
          {Tensor.t(), Tensor.t(), Context.t()}
  def add_layer_norm(x, residual, weight, opts \\ []) do
    opts = validate_opts!(opts, [:bias, eps: @default_eps], "add_layer_norm")
    check_residual!(residual, "add_layer_norm")
    forward(:layer_norm, x, residual, weight, opts[:bias], opts[:eps])
  end

  defp forward(kind, x, residual, weight, bias, eps) do
    {y, sum, mean, rstd} =
      Mambex.retry_oom(fn -> NIF.norm_forward(kind, x, residual, weight, bias, eps) end)

    ctx = %Context{
      kind: kind,
      s: if(residual, do: sum, else: x),
      weight: weight,
      bias: bias,
      mean: mean,
      rstd: rstd,
      eps: eps,
      residual?: residual != nil
    }

    {y, sum, ctx}
  end

  @doc """
  Gradients of a norm given `dy` (the gradient of `y`, io type, the shape
  of `x`).

  Options:

    * `:d_sum` — the gradient of the returned sum along the residual stream
      (`add_` variants only; default zeros); it is added to the input
      gradient
    * `:into` — `%{weight: t}` (plus `bias: t` when the forward had a bias):
      add the parameter gradients into these tensors in place

  Returns `%{x: dx, weight: d_weight}`, plus `bias: d_bias` when the forward
  had a bias and `residual: dx` (the same tensor as `:x`) for the `add_`
  variants.
  """
  @spec backward(Context.t(), Tensor.t(), keyword()) :: gradients()
  def backward(context, dy, opts \\ [])

  def backward(%Context{} = ctx, dy, opts) do
    opts = validate_opts!(opts, [:d_sum, :into], "norm_backward")

    if opts[:d_sum] != nil and not ctx.residual? do
      raise ArgumentError,
            "norm_backward: d_sum is for the add_ variants (add_rms_norm, add_layer_norm) only"
    end

    {into_w, into_b} = into!(opts[:into], ctx)

    {dx, dw, db} =
      Mambex.retry_oom(fn ->
        NIF.norm_backward(
          ctx.kind,
          ctx.s,
          ctx.weight,
          ctx.bias,
          ctx.mean,
          ctx.rstd,
          dy,
          opts[:d_sum],
          into_w,
          into_b
        )
      end)

    grads = %{x: dx, weight: dw}
    grads = if ctx.bias, do: Map.put(grads, :bias, db), else: grads
    if ctx.residual?, do: Map.put(grads, :residual, dx), else: grads
  end

  def backward(other, _dy, _opts) do
    raise ArgumentError,
          "norm_backward: context must be a Mambex.Norm.Context from a Mambex.Norm forward, " <>
            "got: #{inspect(other, limit: 5)}"
  end

  defp into!(nil, _ctx), do: {nil, nil}

  defp into!(into, ctx) when is_map(into) do
    wanted = if ctx.bias, do: [:bias, :weight], else: [:weight]

    unless into |> Map.keys() |> Enum.sort() == wanted do
      raise ArgumentError,
            "norm_backward: into must hold exactly the keys #{inspect(wanted)} (a tensor for " <>
              "every parameter gradient), got: #{inspect(Map.keys(into))}"
    end

    {into.weight, Map.get(into, :bias)}
  end

  defp into!(other, _ctx) do
    raise ArgumentError,
          "norm_backward: into must be a map of gradient tensors, got: #{inspect(other, limit: 5)}"
  end

  defp check_residual!(nil, op),
    do: raise(ArgumentError, "#{op}: residual must be a Mambex.Tensor, got: nil")

  defp check_residual!(_, _), do: :ok

  defp validate_opts!(opts, allowed, fun) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError,
            "#{fun}: options must be a keyword list, got: #{inspect(opts, limit: 5)}"
    end

    opts =
      try do
        Keyword.validate!(opts, allowed)
      rescue
        e in ArgumentError ->
          reraise ArgumentError, "#{fun}: #{Exception.message(e)}", __STACKTRACE__
      end

    case Keyword.fetch(opts, :eps) do
      {:ok, eps} when not (is_number(eps) and eps >= 0) ->
        raise ArgumentError, "#{fun}: eps must be a number >= 0, got: #{inspect(eps, limit: 5)}"

      _ ->
        opts
    end
  end
end
