defmodule Mambex.NormReference do
  @moduledoc false
  # Plain float64 references of RMSNorm / LayerNorm (with the residual add),
  # written from the formulas in Mambex.Norm, independently of the C code:
  # lists, one row at a time. Validated against finite differences of its
  # own forward in test/norm_test.exs.

  @doc """
  Forward over rows of `dim`: x and residual (or nil) are flat lists, w and
  b (or nil) lists of dim. Returns %{y, sum, mean, rstd} (flat lists; mean
  is all zeros for :rms_norm).
  """
  def norm_forward(kind, x, residual, w, b, dim, eps) do
    s = if residual, do: Enum.zip_with(x, residual, &(&1 + &2)), else: x

    rows =
      for row <- Enum.chunk_every(s, dim) do
        mean = if kind == :layer_norm, do: Enum.sum(row) / dim, else: 0.0
        var = Enum.sum(for v <- row, do: (v - mean) * (v - mean)) / dim
        rstd = 1.0 / :math.sqrt(var + eps)

        y =
          for {{v, wj}, j} <- Enum.with_index(Enum.zip(row, w)) do
            bj = if b, do: Enum.at(b, j), else: 0.0
            (v - mean) * rstd * wj + bj
          end

        {y, mean, rstd}
      end

    %{
      y: Enum.flat_map(rows, &elem(&1, 0)),
      sum: s,
      mean: Enum.map(rows, &elem(&1, 1)),
      rstd: Enum.map(rows, &elem(&1, 2))
    }
  end

  @doc """
  Backward from the normalised input s (flat), w, dy (flat) and d_sum (flat
  or nil): %{dx, dw, db} (db: the column sums of dy). Statistics recomputed
  from s in float64.
  """
  def norm_backward(kind, s, w, dy, d_sum, dim, eps) do
    per_row =
      for {row, gy} <- Enum.zip(Enum.chunk_every(s, dim), Enum.chunk_every(dy, dim)) do
        mean = if kind == :layer_norm, do: Enum.sum(row) / dim, else: 0.0
        var = Enum.sum(for v <- row, do: (v - mean) * (v - mean)) / dim
        rstd = 1.0 / :math.sqrt(var + eps)
        xhat = for v <- row, do: (v - mean) * rstd
        g = Enum.zip_with(gy, w, &(&1 * &2))
        mgx = Enum.sum(Enum.zip_with(g, xhat, &(&1 * &2))) / dim
        mg = if kind == :layer_norm, do: Enum.sum(g) / dim, else: 0.0
        ds = Enum.zip_with(g, xhat, fn gj, xj -> rstd * (gj - mg - xj * mgx) end)
        dw = Enum.zip_with(gy, xhat, &(&1 * &2))
        {ds, dw, gy}
      end

    ds = Enum.flat_map(per_row, &elem(&1, 0))
    dx = if d_sum, do: Enum.zip_with(ds, d_sum, &(&1 + &2)), else: ds
    zeros = List.duplicate(0.0, dim)

    col_sum = fn k ->
      Enum.reduce(per_row, zeros, fn r, acc -> Enum.zip_with(acc, elem(r, k), &(&1 + &2)) end)
    end

    %{dx: dx, dw: col_sum.(1), db: col_sum.(2)}
  end
end
