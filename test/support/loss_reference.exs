defmodule Mambex.LossReference do
  @moduledoc """
  Plain float64 references of the losses (Mambex.Loss), written from the
  definitions with Elixir lists: no library call, no optimised code.

  Cross-entropy: `rows` is a list of rows (lists of C floats), `targets` a
  list of integers. Options: :reduction (:mean | :sum), :ignore_index,
  :weights (list of C floats), :scale. A target outside 0..C-1 that is not
  the ignore index makes the loss and its row's gradient :nan and counts 1
  in the mean's denominator.
  """

  @doc "Returns {loss, gradient rows}; :nan marks NaN."
  def cross_entropy(rows, targets, opts \\ []) do
    reduction = Keyword.get(opts, :reduction, :mean)
    scale = Keyword.get(opts, :scale, 1.0)
    ignore = Keyword.get(opts, :ignore_index)
    weights = Keyword.get(opts, :weights)
    c = rows |> hd() |> length()

    kinds =
      Enum.map(targets, fn t ->
        cond do
          ignore != nil and t == ignore -> :ignored
          t < 0 or t >= c -> :bad
          true -> :valid
        end
      end)

    w_of = fn t -> if weights, do: Enum.at(weights, t), else: 1.0 end

    den =
      if reduction == :mean do
        Enum.zip(targets, kinds)
        |> Enum.map(fn
          {_t, :ignored} -> 0.0
          {_t, :bad} -> 1.0
          {t, :valid} -> w_of.(t)
        end)
        |> Enum.sum()
      else
        1.0
      end

    g = if den == 0.0, do: 0.0, else: scale / den

    per_row =
      Enum.zip([rows, targets, kinds])
      |> Enum.map(fn
        {x, _t, :ignored} ->
          {0.0, List.duplicate(0.0, length(x))}

        {x, _t, :bad} ->
          {:nan, List.duplicate(:nan, length(x))}

        {x, t, :valid} ->
          w = w_of.(t)
          m = Enum.max(x)
          e = Enum.map(x, &:math.exp(&1 - m))
          s = Enum.sum(e)
          lse = m + :math.log(s)
          xt = Enum.at(x, t)

          grad =
            e
            |> Enum.with_index()
            |> Enum.map(fn {ej, j} ->
              onehot = if j == t, do: 1.0, else: 0.0
              g * w * (ej / s - onehot)
            end)

          {w * (lse - xt), grad}
      end)

    terms = Enum.map(per_row, &elem(&1, 0))

    loss =
      if Enum.any?(terms, &(&1 == :nan)),
        do: :nan,
        else: g * Enum.sum(terms)

    {loss, Enum.map(per_row, &elem(&1, 1))}
  end

  @doc "Returns {loss, dpred} of the squared error of two flat lists."
  def mse(pred, target, opts \\ []) do
    reduction = Keyword.get(opts, :reduction, :mean)
    scale = Keyword.get(opts, :scale, 1.0)
    n = length(pred)

    g =
      cond do
        reduction == :sum -> scale
        n == 0 -> 0.0
        true -> scale / n
      end

    d = Enum.zip_with(pred, target, &(&1 - &2))
    {g * Enum.sum(Enum.map(d, &(&1 * &1))), Enum.map(d, &(2.0 * g * &1))}
  end

  @doc """
  Central finite differences of `f` (a function of a flat list of floats
  returning a float) at `xs`, step h.
  """
  def finite_differences(f, xs, h \\ 1.0e-6) do
    t = List.to_tuple(xs)

    for i <- 0..(tuple_size(t) - 1)//1 do
      xi = elem(t, i)
      plus = f.(Tuple.to_list(put_elem(t, i, xi + h)))
      minus = f.(Tuple.to_list(put_elem(t, i, xi - h)))
      (plus - minus) / (2 * h)
    end
  end
end
