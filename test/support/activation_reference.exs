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
  def act(:gelu, x), do: 0.5 * x * (1.0 + :math.tanh(@k * (x + @c * x * x * x)))

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
    t = :math.tanh(@k * (x + @c * x * x * x))
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * @k * (1.0 + 3.0 * @c * x * x)
  end

  def swiglu(a, b), do: Enum.zip_with(a, b, fn x, y -> act(:silu, x) * y end)

  def swiglu_backward(a, b, dout) do
    da = Enum.zip_with([a, b, dout], fn [x, y, g] -> g * y * dact(:silu, x) end)
    db = Enum.zip_with(a, dout, fn x, g -> g * act(:silu, x) end)
    {da, db}
  end
end
