defmodule Mambex.Ops do
  @moduledoc """
  Elementwise operations and reductions on `Mambex.Tensor`s.

  Every op takes tensors on one device and of one type, returns a new tensor
  on that device, and on a CUDA device is enqueued without waiting.

  ## Broadcasting

  Binary ops accept, for each operand, a tensor or a number (not both
  numbers). Two tensors must either have the same shape, or one's shape must
  be a suffix of the other's: a `{d}` bias broadcasts against `{b, l, d}`,
  a `{}` scalar tensor against anything. The result has the larger shape.

  ## Numerics

  f32, bf16 and f16 compute in fp32, f64 in fp64, integer types in 64-bit
  integers wrapped to the type. Integer `divide/2` truncates toward zero (and
  gives 0 for a zero divisor); cast to a float type first for a float
  quotient. Reductions accumulate in a fixed order, so results are identical
  from run to run on one device.
  """

  alias Mambex.NIF
  alias Mambex.Tensor

  @type operand :: Tensor.t() | number()

  @doc "`a + b` elementwise."
  @spec add(operand(), operand()) :: Tensor.t()
  def add(a, b), do: binary(:add, a, b)

  @doc "`a - b` elementwise."
  @spec subtract(operand(), operand()) :: Tensor.t()
  def subtract(a, b), do: binary(:subtract, a, b)

  @doc "`a * b` elementwise."
  @spec multiply(operand(), operand()) :: Tensor.t()
  def multiply(a, b), do: binary(:multiply, a, b)

  @doc "`a / b` elementwise (truncating for integer types)."
  @spec divide(operand(), operand()) :: Tensor.t()
  def divide(a, b), do: binary(:divide, a, b)

  @doc "The larger of `a` and `b` elementwise (NaN if either is NaN)."
  @spec maximum(operand(), operand()) :: Tensor.t()
  def maximum(a, b), do: binary(:maximum, a, b)

  @doc "The smaller of `a` and `b` elementwise (NaN if either is NaN)."
  @spec minimum(operand(), operand()) :: Tensor.t()
  def minimum(a, b), do: binary(:minimum, a, b)

  defp binary(op, a, b), do: Mambex.retry_oom(fn -> NIF.binary(op, a, b) end)

  @doc "`-x` elementwise."
  @spec negate(Tensor.t()) :: Tensor.t()
  def negate(x), do: unary(:negate, x)

  @doc "`exp(x)` elementwise (float types)."
  @spec exp(Tensor.t()) :: Tensor.t()
  def exp(x), do: unary(:exp, x)

  @doc "Natural `log(x)` elementwise (float types)."
  @spec log(Tensor.t()) :: Tensor.t()
  def log(x), do: unary(:log, x)

  @doc "`sqrt(x)` elementwise (float types)."
  @spec sqrt(Tensor.t()) :: Tensor.t()
  def sqrt(x), do: unary(:sqrt, x)

  defp unary(op, x), do: Mambex.retry_oom(fn -> NIF.unary(op, x) end)

  @doc "`alpha * x + y` for `x` and `y` of one shape, type and device."
  @spec axpy(number(), Tensor.t(), Tensor.t()) :: Tensor.t()
  def axpy(alpha, x, y), do: Mambex.retry_oom(fn -> NIF.axpy(alpha, x, y) end)

  @doc """
  Sum over all elements (a rank-0 tensor) or over `axis: k`, which removes
  that axis. The sum over an empty axis is 0.
  """
  @spec sum(Tensor.t(), keyword()) :: Tensor.t()
  def sum(x, opts \\ []), do: reduce(:sum, x, opts)

  @doc "Mean over all elements or over `axis: k` (float types)."
  @spec mean(Tensor.t(), keyword()) :: Tensor.t()
  def mean(x, opts \\ []), do: reduce(:mean, x, opts)

  @doc "Maximum over all elements or over `axis: k` (NaN propagates)."
  @spec max(Tensor.t(), keyword()) :: Tensor.t()
  def max(x, opts \\ []), do: reduce(:max, x, opts)

  defp reduce(op, x, opts) when is_list(opts),
    do: Mambex.retry_oom(fn -> NIF.reduce(op, x, Keyword.get(opts, :axis)) end)

  defp reduce(_op, _x, opts),
    do: raise(ArgumentError, "options must be a keyword list, got: #{inspect(opts)}")

  @doc "Converts to another type (floats to integers truncate toward zero; NaN becomes 0)."
  @spec cast(Tensor.t(), Tensor.type()) :: Tensor.t()
  def cast(x, type), do: Mambex.retry_oom(fn -> NIF.cast(x, type) end)
end
