defmodule Mambex.Linear do
  @moduledoc """
  The linear (fully connected) layer, forward and backward, and a general
  rank-2 matrix product.

  ## Semantics

  For `x` of shape `{..., K}` (any rank >= 1, features last) and `w` of
  shape `{K, N}`:

      forward:   y  = x · w + bias                    y: {..., N}
      backward:  dx = dy · wᵀ                         dx: x's shape
                 dw = xᵀ · dy   (x, dy flattened to {rows, K}, {rows, N})
                 db = Σ_rows dy                       db: {N}

  where `rows` is the product of x's leading axes (it may be 0, and so may
  `K` and `N`: empty products give zeros, `y = bias` when `K = 0`).

  `matmul/3` computes `alpha · op(a) · op(b)` for rank-2 `a`, `b`, where
  `op(t)` is `t` or its transpose (`transpose_a:`, `transpose_b:`), and with
  `into: c` it computes `c = alpha · op(a) · op(b) + beta · c` in place.

  Gradient accumulation: `backward/4` with `into: %{w: dw, bias: db}` adds
  the weight (and bias) gradients into those tensors in place and returns
  them in the result map; the input gradient `:x` is always a new tensor.

  ## Shapes and types

  | argument | shape | type |
  |---|---|---|
  | `x`, `dx` | `{..., K}` | t |
  | `w`, `dw`, `into: %{w: _}` | `{K, N}` | t |
  | `:bias`, `db`, `into: %{bias: _}` | `{N}` | t |
  | `y`, `dy` | `{..., N}` (x's leading axes) | t |
  | `matmul` `a`, `b` | rank 2; `op(a)` `{m, k}`, `op(b)` `{k, n}` | t |
  | `matmul` result, `into:` | `{m, n}` | t |

  Every tensor of a call has the same type `t` and lives on one device: on
  the CPU `{:f, 32}` or `{:f, 64}`, on CUDA `{:f, 32}` or `{:bf, 16}`
  (bf16 data, fp32 accumulation). Wrong shapes, types or devices, freed
  tensors and unknown options raise `ArgumentError` naming the argument.

  ## Numerics

  `precision: :fp32` (the default) computes products and sums in fp32 (fp64
  for f64); `precision: :tf32` lets CUDA use TF32 tensor cores for f32
  tensors: inputs rounded to a 10-bit mantissa, fp32 accumulation, a
  relative error of about 1e-3 (the CPU ignores it). Against a float64
  reference the relative error `‖out − ref‖ / ‖ref‖` is below 1e-5 for f32
  at the sizes of a layer (it grows like √K at worst), about 1e-2 for bf16.
  Results are bit-identical from run to run on one device: the CPU sums
  every element in a fixed order whatever the number of threads, cuBLASLt
  runs a fixed algorithm per shape, and the bias gradient is a two-stage
  column sum in a fixed order (no atomics).

  ## Performance

  CUDA runs cuBLASLt, the bias folded into the GEMM's epilogue (the forward
  is one kernel); the backward is two GEMMs and a column sum. Large `:tf32`
  forwards with k of 64, 128 or 256 and n a multiple of 128 run our own
  Hopper (sm_90) wgmma kernel instead, also one kernel with the bias. On an
  H200, x `{15360, 256}` · w `{256, 1024}` + bias takes 35 µs forward /
  109 µs backward with `:tf32`, 194 / 374 µs with `:fp32`, 24 / 55 µs in
  bf16. With `:tf32`, results are also bit-identical from run to run, but
  the two kernels round differently, so a forward at a shape the wgmma
  kernel takes need not match cuBLASLt's bits.
  The CPU runs a blocked GEMM (packed panels, a register-tiled micro-kernel
  in AVX-512, AVX2+FMA or SSE, chosen at run time) threaded over blocks of
  the output: about 190 GFLOP/s f32 on the 2-core CI machine and 1 TFLOP/s
  on 16 cores at 1920 × 256 × 1024. See `bench/linear_bench_test.exs` and
  `bench/results/linear.csv`.
  """

  alias Mambex.NIF
  alias Mambex.Tensor

  @type precision :: :fp32 | :tf32
  @type gradients :: %{
          required(:w) => Tensor.t(),
          optional(:x) => Tensor.t(),
          optional(:bias) => Tensor.t()
        }

  @doc """
  `y = x · w + bias`.

    * `x` — `{..., K}`
    * `w` — `{K, N}`

  Options:

    * `:bias` — `{N}` tensor added to every row (default none)
    * `:precision` — `:fp32` (default) or `:tf32` (see the module doc)

  Returns `y` of shape `{..., N}`.
  """
  @spec forward(Tensor.t(), Tensor.t(), keyword()) :: Tensor.t()
  def forward(x, w, opts \\ []) do
    opts = validate_opts!(opts, [:bias, precision: :fp32], "linear_forward")
    Mambex.retry_oom(fn -> NIF.linear_forward(x, w, opts[:bias], opts[:precision]) end)
  end

  @doc """
  Gradients of `forward/3` given `dy`, the gradient of `y`.

    * `x`, `w` — the forward's inputs
    * `dy` — `{..., N}`, x's leading axes

  Options:

    * `:bias` — `true` to compute the bias gradient `:bias` (default `false`)
    * `:input_grad` — `false` skips `dx` (default `true`), e.g. for a first layer
    * `:precision` — `:fp32` (default) or `:tf32`
    * `:into` — `%{w: tensor}`, plus `bias: tensor` when `bias: true`: the
      weight and bias gradients are added to these tensors in place (they
      must not share memory with `x`, `w`, `dy` or each other). Also, or
      alone, `x: tensor` of `x`'s shape (with `input_grad`): `dx` is added to
      it in place, e.g. to sum the input gradients of two branches without
      an extra add.

  Returns `%{w: dw}` plus `x: dx` (when `input_grad`) and `bias: db` (when
  `bias`); with `:into`, `:w`, `:bias` and `:x` are the `into` tensors.
  """
  @spec backward(Tensor.t(), Tensor.t(), Tensor.t(), keyword()) :: gradients()
  def backward(x, w, dy, opts \\ []) do
    opts =
      validate_opts!(
        opts,
        [:into, bias: false, input_grad: true, precision: :fp32],
        "linear_backward"
      )

    {into_w, into_bias, into_x} = into!(opts[:into], opts[:bias], opts[:input_grad])

    Mambex.retry_oom(fn ->
      NIF.linear_backward(
        x,
        w,
        dy,
        opts[:bias],
        opts[:input_grad],
        opts[:precision],
        into_w,
        into_bias,
        into_x
      )
    end)
  end

  @doc """
  Rank-2 matrix product `alpha · op(a) · op(b)`.

  Options:

    * `:transpose_a`, `:transpose_b` — use the transpose of `a` / `b` (default `false`)
    * `:alpha` — a number scaling the product (default `1.0`)
    * `:into` — a `{m, n}` tensor `c`: computes `c = alpha · op(a) · op(b) + beta · c`
      in place and returns `c` (it must not share memory with `a` or `b`)
    * `:beta` — the scale of `c` (default `1.0` with `:into`; not allowed without it)
    * `:precision` — `:fp32` (default) or `:tf32`

  Returns a new `{m, n}` tensor, or the `:into` tensor.
  """
  @spec matmul(Tensor.t(), Tensor.t(), keyword()) :: Tensor.t()
  def matmul(a, b, opts \\ []) do
    opts =
      validate_opts!(
        opts,
        [:into, :beta, transpose_a: false, transpose_b: false, alpha: 1.0, precision: :fp32],
        "matmul"
      )

    beta =
      case {opts[:into], opts[:beta]} do
        {nil, nil} -> 0.0
        {nil, beta} -> raise ArgumentError, "matmul: beta needs into:, got beta: #{inspect(beta)}"
        {_, nil} -> 1.0
        {_, beta} -> beta
      end

    Mambex.retry_oom(fn ->
      NIF.matmul(
        a,
        b,
        opts[:transpose_a],
        opts[:transpose_b],
        opts[:alpha],
        beta,
        opts[:into],
        opts[:precision]
      )
    end)
  end

  defp into!(nil, _bias, _input_grad), do: {nil, nil, nil}

  # :w and :bias come together (every parameter gradient, or none); :x alone
  # or with them
  defp into!(into, bias, input_grad) when is_map(into) do
    params = if bias == true, do: [:w, :bias], else: [:w]
    allowed = if input_grad == true, do: params ++ [:x], else: params

    case Map.keys(into) -- allowed do
      [] ->
        :ok

      extra ->
        raise ArgumentError,
              "linear_backward: into has keys #{inspect(extra)} for gradients this call does " <>
                "not produce (it produces #{inspect(allowed)})"
    end

    if Enum.any?(params, &Map.has_key?(into, &1)) do
      for key <- params, not Map.has_key?(into, key) do
        raise ArgumentError,
              "linear_backward: into must hold a tensor for every parameter gradient, " <>
                "#{inspect(params)}; #{inspect(key)} is missing"
      end
    end

    if map_size(into) == 0,
      do:
        raise(
          ArgumentError,
          "linear_backward: into is empty (give it :w, :bias or :x, or leave it out)"
        )

    {into[:w], into[:bias], into[:x]}
  end

  defp into!(other, _bias, _input_grad) do
    raise ArgumentError,
          "linear_backward: into must be a map %{w: tensor, bias: tensor, x: tensor}, " <>
            "got: #{inspect(other, limit: 5)}"
  end

  defp validate_opts!(opts, allowed, op) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError,
            "#{op}: options must be a keyword list, got: #{inspect(opts, limit: 5)}"
    end

    try do
      Keyword.validate!(opts, allowed)
    rescue
      e in ArgumentError ->
        reraise ArgumentError, "#{op}: #{Exception.message(e)}", __STACKTRACE__
    end
  end
end
