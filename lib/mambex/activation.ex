defmodule Mambex.Activation do
  @moduledoc """
  Pointwise activations and SwiGLU, forward and backward.

  ## Semantics

      sigmoid(x)  = 1 / (1 + exp(−x))
      silu(x)     = x · sigmoid(x)
      softplus(x) = log(1 + exp(x)), and x itself where x > 20
      gelu(x)     = 0.5 · x · (1 + tanh(sqrt(2/π) · (x + 0.044715 · x³)))   (the tanh form)
      swiglu(a, b) = silu(a) · b

  Each `*_backward(x, dy)` returns `dy · f'(x)`; `swiglu_backward(a, b,
  dout)` returns `{dout · b · silu'(a), dout · silu(a)}`. The derivatives
  are those of the functions as written (softplus' is 1 above 20).

  ## Shapes and types

  Any shape (any rank, any size including 0). The inputs of one call share
  one shape, type and device; outputs have them too. Types: `{:f, 32}` or
  `{:f, 64}` on the CPU, `{:f, 32}` or `{:bf, 16}` on CUDA. Wrong shapes,
  types, devices and freed tensors raise `ArgumentError` naming the argument.

  ## Numerics

  Computed in fp32 (fp64 for f64) with the accurate library functions
  (`expf`, `log1pf`). `sigmoid(x)` and `1 − sigmoid(x)` both come from
  `e = exp(−|x|)` as `1/(1+e)` and `e/(1+e)`: no overflow, no cancellation.
  GELU is evaluated as `x · sigmoid(2u)` (`1 + tanh(u) = 2 sigmoid(2u)`),
  the same function without the cancellation of `1 + tanh(u)` in its left
  tail. Relative error against a float64 reference: about 1e-7 for f32,
  1e-2 for bf16 (one bf16 rounding of the output).

  ## Performance

  CUDA: one grid-stride kernel per call with 16-byte (f32) or 8-byte (bf16)
  vector loads where the tensors are aligned. CPU: fixed chunks on the
  thread pool for large tensors.
  """

  alias Mambex.NIF
  alias Mambex.Tensor

  @doc "`x · sigmoid(x)`, elementwise."
  @spec silu(Tensor.t()) :: Tensor.t()
  def silu(x), do: act(:silu, x)

  @doc "The tanh form of GELU: `0.5 x (1 + tanh(sqrt(2/π)(x + 0.044715 x³)))`, elementwise."
  @spec gelu(Tensor.t()) :: Tensor.t()
  def gelu(x), do: act(:gelu, x)

  @doc "`log(1 + exp(x))`, and `x` where `x > 20`, elementwise."
  @spec softplus(Tensor.t()) :: Tensor.t()
  def softplus(x), do: act(:softplus, x)

  @doc "`1 / (1 + exp(−x))`, elementwise."
  @spec sigmoid(Tensor.t()) :: Tensor.t()
  def sigmoid(x), do: act(:sigmoid, x)

  @doc "`dy · silu'(x)` where `silu'(x) = s (1 + x (1 − s))`, `s = sigmoid(x)`."
  @spec silu_backward(Tensor.t(), Tensor.t()) :: Tensor.t()
  def silu_backward(x, dy), do: act_backward(:silu, x, dy)

  @doc "`dy · gelu'(x)` (the derivative of the tanh form)."
  @spec gelu_backward(Tensor.t(), Tensor.t()) :: Tensor.t()
  def gelu_backward(x, dy), do: act_backward(:gelu, x, dy)

  @doc "`dy · sigmoid(x)`, and `dy` where `x > 20`."
  @spec softplus_backward(Tensor.t(), Tensor.t()) :: Tensor.t()
  def softplus_backward(x, dy), do: act_backward(:softplus, x, dy)

  @doc "`dy · s (1 − s)`, `s = sigmoid(x)`."
  @spec sigmoid_backward(Tensor.t(), Tensor.t()) :: Tensor.t()
  def sigmoid_backward(x, dy), do: act_backward(:sigmoid, x, dy)

  @doc "`silu(a) · b`, elementwise; `a` and `b` of one shape, type and device."
  @spec swiglu(Tensor.t(), Tensor.t()) :: Tensor.t()
  def swiglu(a, b), do: Mambex.retry_oom(fn -> NIF.swiglu_forward(a, b) end)

  @doc "Gradients of `swiglu(a, b)` given `dout`: `{da, db}`."
  @spec swiglu_backward(Tensor.t(), Tensor.t(), Tensor.t()) :: {Tensor.t(), Tensor.t()}
  def swiglu_backward(a, b, dout), do: Mambex.retry_oom(fn -> NIF.swiglu_backward(a, b, dout) end)

  defp act(name, x), do: Mambex.retry_oom(fn -> NIF.act_forward(name, x) end)
  defp act_backward(name, x, dy), do: Mambex.retry_oom(fn -> NIF.act_backward(name, x, dy) end)
end
