defmodule Mambex.LinearReference do
  @moduledoc """
  Plain float64 reference of the linear layer and of matrix products, on
  flat row-major lists. Written for clarity, not speed; it never calls the
  library.

    * `matmul(a, {m, k}, b, {k, n})` — `a · b`, `{m, n}`
    * `transpose(a, {r, c})` — `aᵀ`, `{c, r}`
    * `forward(x, rows, k, w, n, bias)` — `x · w + bias` for x `{rows, k}`
    * `backward(x, rows, k, w, n, dy)` — `%{x: dy · wᵀ, w: xᵀ · dy, bias: Σ_rows dy}`
  """

  @doc "Row-major product of a {m, k} and b {k, n}: {m, n} as a flat list."
  def matmul(a, {m, k}, b, {k2, n}) when k == k2 do
    at = List.to_tuple(a)
    bt = List.to_tuple(b)

    for i <- 0..(m - 1)//1, j <- 0..(n - 1)//1 do
      Enum.reduce(0..(k - 1)//1, 0.0, fn p, s ->
        s + elem(at, i * k + p) * elem(bt, p * n + j)
      end)
    end
  end

  @doc "The transpose of a {r, c} row-major matrix."
  def transpose(a, {r, c}) do
    t = List.to_tuple(a)
    for j <- 0..(c - 1)//1, i <- 0..(r - 1)//1, do: elem(t, i * c + j)
  end

  @doc "x {rows, k} · w {k, n} + bias {n} (bias may be nil)."
  def forward(x, rows, k, w, n, bias) do
    y = matmul(x, {rows, k}, w, {k, n})

    case bias do
      nil ->
        y

      b ->
        bt = List.to_tuple(b)
        y |> Enum.with_index() |> Enum.map(fn {v, i} -> v + elem(bt, rem(i, n)) end)
    end
  end

  @doc "Gradients of forward/6 for the output gradient dy {rows, n}."
  def backward(x, rows, k, w, n, dy) do
    %{
      x: matmul(dy, {rows, n}, transpose(w, {k, n}), {n, k}),
      w: matmul(transpose(x, {rows, k}), {k, rows}, dy, {rows, n}),
      bias: column_sums(dy, rows, n)
    }
  end

  @doc "Sums over the rows of a {rows, cols} matrix."
  def column_sums(x, rows, cols) do
    t = List.to_tuple(x)

    for j <- 0..(cols - 1)//1 do
      Enum.reduce(0..(rows - 1)//1, 0.0, fn i, s -> s + elem(t, i * cols + j) end)
    end
  end

  @doc "alpha · op(a) · op(b) + beta · c (c may be nil)."
  def gemm(a, a_shape, ta, b, b_shape, tb, alpha, beta, c) do
    {a, {m, k}} = if ta, do: {transpose(a, a_shape), swap(a_shape)}, else: {a, a_shape}
    {b, {k2, n}} = if tb, do: {transpose(b, b_shape), swap(b_shape)}, else: {b, b_shape}
    prod = matmul(a, {m, k}, b, {k2, n})

    case c do
      nil -> Enum.map(prod, &(alpha * &1))
      c -> Enum.zip_with(prod, c, fn p, v -> alpha * p + beta * v end)
    end
  end

  defp swap({r, c}), do: {c, r}
end
