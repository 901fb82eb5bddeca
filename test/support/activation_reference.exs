defmodule Mambex.ActivationReference do
  @moduledoc false
  # Plain float64 references of the pointwise activations and SwiGLU, from
  # the formulas in Mambex.Activation, independently of the C code.
  # Validated against finite differences of their own forwards in
  # test/activation_test.exs.

  @k :math.sqrt(2.0 / :math.pi())
  @c 0.044715

  def sigmoid(x) when x >= 0, do: 1.0 / (1.0 + :math.exp(-x))

  def sigmoid(x) do
    e = :math.exp(x)
    e / (1.0 + e)
  end

  def act(:silu, x), do: x * sigmoid(x)
  def act(:sigmoid, x), do: sigmoid(x)
  def act(:softplus, x) when x > 20, do: x
  def act(:softplus, x), do: :math.log(1.0 + :math.exp(x))
  def act(:gelu, x), do: 0.5 * x * one_plus_tanh(@k * (x + @c * x * x * x))

  def dact(:silu, x) do
    s = sigmoid(x)
    s * (1.0 + x * (1.0 - s))
  end

  def dact(:sigmoid, x) do
    s = sigmoid(x)
    s * (1.0 - s)
  end

  def dact(:softplus, x) when x > 20, do: 1.0
  def dact(:softplus, x), do: sigmoid(x)

  def dact(:gelu, x) do
    u = @k * (x + @c * x * x * x)
    # 1 - tanh(u)^2 = (1 + tanh u)(1 - tanh u), each factor without cancellation
    0.5 * one_plus_tanh(u) +
      0.5 * x * one_plus_tanh(u) * one_plus_tanh(-u) * @k * (1.0 + 3.0 * @c * x * x)
  end

  # 1 + tanh(u); for u < 0 as 2 e^(2u) / (1 + e^(2u)), which float64 keeps
  # exact in the far left tail where 1 + tanh(u) would cancel to 0.
  defp one_plus_tanh(u) when u >= 0, do: 1.0 + :math.tanh(u)

  defp one_plus_tanh(u) do
    e = :math.exp(2.0 * u)
    2.0 * e / (1.0 + e)
  end

  def swiglu(a, b), do: Enum.zip_with(a, b, fn x, y -> act(:silu, x) * y end)

  def swiglu_backward(a, b, dout) do
    da = Enum.zip_with([a, b, dout], fn [x, y, g] -> g * y * dact(:silu, x) end)
    db = Enum.zip_with(a, dout, fn x, g -> g * act(:silu, x) end)
    {da, db}
  end
end
