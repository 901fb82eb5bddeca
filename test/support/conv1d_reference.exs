defmodule Mambex.Conv1dReference do
  @moduledoc false
  # A plain float64 reference of the causal depthwise conv1d and its
  # gradient, written from the formulas in Mambex.Conv1d's documentation:
  # tuples and index arithmetic, one element at a time. Validated by finite
  # differences of its own forward in test/conv1d_test.exs.
  #
  # Inputs are a map:
  #   dims: {batch, len, channels, width}
  #   x: flat (B, L, C); weight: flat (C, W); bias: flat (C) or nil;
  #   initial_state: flat (B, C, W-1) or nil; silu: boolean
  # Outputs are flat row-major lists of floats.

  defp sigmoid(p), do: 1.0 / (1.0 + :math.exp(-p))

  # xpad[b, s, c]: x for s >= 0, the initial state (or 0) for -K <= s < 0.
  defp xpad(t, {_bsz, len, ch, w}, b, s, c) do
    k = w - 1

    cond do
      s >= 0 -> elem(t.x, (b * len + s) * ch + c)
      t.h0 == nil -> 0.0
      true -> elem(t.h0, (b * ch + c) * k + k + s)
    end
  end

  defp pre(t, dims, b, s, c) do
    {_bsz, _len, _ch, w} = dims
    bias = if t.bias, do: elem(t.bias, c), else: 0.0

    Enum.reduce(0..(w - 1), bias, fn j, acc ->
      acc + elem(t.w, c * w + j) * xpad(t, dims, b, s + j - (w - 1), c)
    end)
  end

  defp tuples(p) do
    %{
      x: List.to_tuple(p.x),
      w: List.to_tuple(p.weight),
      bias: p.bias && List.to_tuple(p.bias),
      h0: p.initial_state && List.to_tuple(p.initial_state)
    }
  end

  @doc "Returns %{out: (B, L, C), final_state: (B, C, W-1)}."
  def forward(p) do
    {bsz, len, ch, w} = dims = p.dims
    t = tuples(p)

    out =
      for b <- 0..(bsz - 1)//1, s <- 0..(len - 1)//1, c <- 0..(ch - 1)//1 do
        v = pre(t, dims, b, s, c)
        if p.silu, do: v * sigmoid(v), else: v
      end

    final =
      for b <- 0..(bsz - 1)//1, c <- 0..(ch - 1)//1, k <- 0..(w - 2)//1 do
        xpad(t, dims, b, len - (w - 1) + k, c)
      end

    %{out: out, final_state: final}
  end

  @doc """
  Per output element (B, L, C), the sum of the magnitudes of the terms of
  its pre-activation, |bias| + sum_j |weight * xpad|: the size that fp32
  rounding is proportional to, however much the terms cancel.
  """
  def magnitude(p) do
    {bsz, len, ch, w} = p.dims
    t = tuples(p)

    for b <- 0..(bsz - 1)//1, s <- 0..(len - 1)//1, c <- 0..(ch - 1)//1 do
      bias = if t.bias, do: abs(elem(t.bias, c)), else: 0.0

      Enum.reduce(0..(w - 1), bias, fn j, acc ->
        acc + abs(elem(t.w, c * w + j) * xpad(t, p.dims, b, s + j - (w - 1), c))
      end)
    end
  end

  @doc """
  Gradients for d_out (B, L, C) and d_final (B, C, W-1) or nil: %{x:, weight:}
  plus :bias and :initial_state when those inputs were given.
  """
  def backward(p, d_out, d_final) do
    {bsz, len, ch, w} = dims = p.dims
    k = w - 1
    t = tuples(p)
    dout = List.to_tuple(d_out)
    dfin = d_final && List.to_tuple(d_final)

    # g[b, s, c] = d out / d pre (0 outside [0, L))
    g =
      for b <- 0..(bsz - 1)//1, s <- 0..(len - 1)//1, c <- 0..(ch - 1)//1 do
        d = elem(dout, (b * len + s) * ch + c)

        if p.silu do
          v = pre(t, dims, b, s, c)
          sg = sigmoid(v)
          d * sg * (1.0 + v * (1.0 - sg))
        else
          d
        end
      end
      |> List.to_tuple()

    gat = fn b, s, c -> if s >= 0 and s < len, do: elem(g, (b * len + s) * ch + c), else: 0.0 end

    # d loss / d xpad[b, s, c]: through the outputs it feeds and the final state
    dxpad = fn b, s, c ->
      through_out =
        Enum.reduce(0..(w - 1), 0.0, fn j, acc ->
          acc + elem(t.w, c * w + j) * gat.(b, s + (w - 1) - j, c)
        end)

      through_final =
        if dfin != nil and s >= len - k, do: elem(dfin, (b * ch + c) * k + s - len + k), else: 0.0

      through_out + through_final
    end

    dx = for b <- 0..(bsz - 1)//1, s <- 0..(len - 1)//1, c <- 0..(ch - 1)//1, do: dxpad.(b, s, c)

    dw =
      for c <- 0..(ch - 1)//1, j <- 0..(w - 1) do
        for(b <- 0..(bsz - 1)//1, s <- 0..(len - 1)//1,
          do: gat.(b, s, c) * xpad(t, dims, b, s + j - k, c)
        )
        |> Enum.sum()
      end

    res = %{x: dx, weight: dw}

    res =
      if p.bias do
        db =
          for c <- 0..(ch - 1)//1 do
            for(b <- 0..(bsz - 1)//1, s <- 0..(len - 1)//1, do: gat.(b, s, c)) |> Enum.sum()
          end

        Map.put(res, :bias, db)
      else
        res
      end

    if p.initial_state do
      dh0 =
        for b <- 0..(bsz - 1)//1, c <- 0..(ch - 1)//1, i <- 0..(k - 1)//1,
          do: dxpad.(b, i - k, c)

      Map.put(res, :initial_state, dh0)
    else
      res
    end
  end
end
