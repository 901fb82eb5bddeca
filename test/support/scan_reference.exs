defmodule Mambex.ScanReference do
  @moduledoc false
  # A plain float64 reference of the Mamba-1 selective scan and its gradient,
  # written independently of the C code: lists and tuples, one channel at a
  # time, the formulas as stated (see Mambex.Scan and the derivation at the
  # top of c_src/cpu/scan_cpu.c). Slow, obvious, and validated by finite
  # differences of its own forward in test/scan_test.exs.
  #
  # Inputs are a map:
  #   dims: {batch, len, dim, dstate, groups}
  #   u, delta, a, b, c: flat row-major lists ((B,L,D), (B,L,D), (D,N), (B,L,G,N), (B,L,G,N))
  #   d, z, delta_bias, initial_state, reset: flat lists or nil ((D), (B,L,D), (D), (B,D,N), (B,L))
  #   softplus: boolean
  # Outputs are flat row-major lists of floats.

  @doc "Returns %{out: (B,L,D), final_state: (B,D,N)}."
  def forward(p) do
    {bsz, len, dim, _n, _g} = p.dims
    t = tuples(p)

    per =
      for b <- 0..(bsz - 1)//1 do
        for d <- 0..(dim - 1)//1, do: channel_forward(t, b, d)
      end

    out = for chans <- per, do: chans |> Enum.map(fn {outs, _h} -> outs end) |> transpose(len)
    final = for chans <- per, {_outs, h} <- chans, do: h
    %{out: List.flatten(out), final_state: List.flatten(final)}
  end

  @doc """
  Gradients for d_out (B,L,D) and d_final_state (B,D,N) or nil: a map with
  :u, :delta, :a, :b, :c, :d, :z, :delta_bias, :initial_state (the last four
  only when those inputs were given).
  """
  def backward(p, d_out, d_final) do
    {bsz, len, dim, _n, g} = p.dims
    t = tuples(p)
    t = Map.merge(t, %{d_out: List.to_tuple(d_out), d_final: d_final && List.to_tuple(d_final)})

    per =
      for b <- 0..(bsz - 1)//1 do
        for d <- 0..(dim - 1)//1, do: channel_backward(t, b, d)
      end

    by_bl = fn key ->
      per
      |> Enum.map(fn chans -> chans |> Enum.map(& &1[key]) |> transpose(len) end)
      |> List.flatten()
    end

    dg = div(dim, g)

    # dB, dC: (B, L, G, N), the sum over the channels of each group
    group_sum = fn key ->
      for chans <- per do
        groups =
          for gi <- 0..(g - 1)//1 do
            chans
            |> Enum.slice(gi * dg, dg)
            |> Enum.map(& &1[key])
            |> Enum.reduce(fn x, acc -> zip_add2(x, acc) end)
          end

        # groups: [g][t][n] -> [t][g][n]
        Enum.zip_with(groups, & &1)
      end
      |> List.flatten()
    end

    batch_sum = fn key ->
      per
      |> Enum.map(fn chans -> Enum.map(chans, & &1[key]) end)
      |> Enum.reduce(fn x, acc -> zip_add_any(x, acc) end)
      |> List.flatten()
    end

    grads = %{
      u: by_bl.(:du),
      delta: by_bl.(:ddelta),
      b: if(len > 0 and bsz > 0, do: group_sum.(:db), else: []),
      c: if(len > 0 and bsz > 0, do: group_sum.(:dc), else: []),
      a: batch_sum.(:da)
    }

    grads = if p.d, do: Map.put(grads, :d, batch_sum.(:dd)), else: grads
    grads = if p.z, do: Map.put(grads, :z, by_bl.(:dz)), else: grads
    grads = if p.delta_bias, do: Map.put(grads, :delta_bias, batch_sum.(:dbias)), else: grads

    if p.initial_state do
      Map.put(grads, :initial_state, List.flatten(for chans <- per, ch <- chans, do: ch.dh0))
    else
      grads
    end
  end

  # ---- per channel ---------------------------------------------------------

  defp tuples(p) do
    {_bsz, _len, _dim, n, _g} = p.dims

    %{
      dims: p.dims,
      n: n,
      softplus: p.softplus,
      u: List.to_tuple(p.u),
      delta: List.to_tuple(p.delta),
      a: List.to_tuple(p.a),
      b: List.to_tuple(p.b),
      c: List.to_tuple(p.c),
      d: p.d && List.to_tuple(p.d),
      z: p.z && List.to_tuple(p.z),
      delta_bias: p.delta_bias && List.to_tuple(p.delta_bias),
      initial_state: p.initial_state && List.to_tuple(p.initial_state),
      reset: p.reset && List.to_tuple(p.reset)
    }
  end

  defp row(tuple, start, n), do: for(k <- 0..(n - 1), do: elem(tuple, start + k))

  # The quantities of step t of channel d of batch b.
  defp step(t, b, d, ti) do
    {_bsz, len, dim, n, g} = t.dims
    gi = div(d, div(dim, g))
    i = (b * len + ti) * dim + d
    x = elem(t.delta, i) + if(t.delta_bias, do: elem(t.delta_bias, d), else: 0.0)
    dt = if t.softplus, do: softplus(x), else: x
    brow = ((b * len + ti) * g + gi) * n

    %{
      i: i,
      x: x,
      dt: dt,
      u: elem(t.u, i),
      z: t.z && elem(t.z, i),
      reset: t.reset != nil and elem(t.reset, b * len + ti) != 0,
      bt: row(t.b, brow, n),
      ct: row(t.c, brow, n)
    }
  end

  defp start_state(t, b, d) do
    {_bsz, _len, dim, n, _g} = t.dims

    if t.initial_state,
      do: row(t.initial_state, (b * dim + d) * n, n),
      else: List.duplicate(0.0, n)
  end

  defp dskip(t, d), do: if(t.d, do: elem(t.d, d), else: 0.0)

  # One step forward: the state entering (after a reset), a = exp(dt A), h, y.
  defp advance(s, a_row, h, dd) do
    prev = if s.reset, do: Enum.map(h, fn _ -> 0.0 end), else: h
    av = Enum.map(a_row, fn ak -> :math.exp(s.dt * ak) end)

    hn = Enum.zip_with([av, prev, s.bt], fn [ak, hk, bk] -> ak * hk + s.dt * bk * s.u end)

    y = dot(s.ct, hn) + dd * s.u
    {prev, av, hn, y}
  end

  defp channel_forward(t, b, d) do
    {_bsz, len, _dim, n, _g} = t.dims
    a_row = row(t.a, d * n, n)
    dd = dskip(t, d)

    {outs, h} =
      Enum.reduce(0..(len - 1)//1, {[], start_state(t, b, d)}, fn ti, {acc, h} ->
        s = step(t, b, d, ti)
        {_prev, _av, hn, y} = advance(s, a_row, h, dd)
        out = if s.z, do: y * silu(s.z), else: y
        {[out | acc], hn}
      end)

    {Enum.reverse(outs), h}
  end

  defp channel_backward(t, b, d) do
    {_bsz, len, dim, n, _g} = t.dims
    a_row = row(t.a, d * n, n)
    dd = dskip(t, d)

    # forward, keeping every step (in reverse order)
    {steps, _h} =
      Enum.reduce(0..(len - 1)//1, {[], start_state(t, b, d)}, fn ti, {acc, h} ->
        s = step(t, b, d, ti)
        {prev, av, hn, y} = advance(s, a_row, h, dd)
        {[{s, prev, av, hn, y} | acc], hn}
      end)

    carry = if t.d_final, do: row(t.d_final, (b * dim + d) * n, n), else: List.duplicate(0.0, n)

    zero_n = List.duplicate(0.0, n)

    init = %{
      carry: carry,
      da: zero_n,
      dd: 0.0,
      dbias: 0.0,
      du: [],
      ddelta: [],
      dz: [],
      db: [],
      dc: []
    }

    r =
      Enum.reduce(steps, init, fn {s, prev, av, hn, y}, acc ->
        g = elem(t.d_out, s.i)

        {dy, dz} =
          if s.z do
            sg = sigmoid(s.z)
            {g * s.z * sg, g * y * sg * (1 + s.z * (1 - sg))}
          else
            {g, 0.0}
          end

        dh = Enum.zip_with(acc.carry, s.ct, fn ck, cn -> ck + dy * cn end)
        ga = Enum.zip_with([dh, prev, av], fn [x, p, a] -> x * p * a end)
        sdb = dot(dh, s.bt)
        ddt = dot(ga, a_row) + s.u * sdb
        dx = if t.softplus and s.x <= 20, do: ddt * sigmoid(s.x), else: ddt

        %{
          carry: if(s.reset, do: zero_n, else: Enum.zip_with(dh, av, &(&1 * &2))),
          da: Enum.zip_with(acc.da, ga, fn x, gk -> x + gk * s.dt end),
          dd: acc.dd + dy * s.u,
          dbias: acc.dbias + dx,
          du: [s.dt * sdb + dy * dd | acc.du],
          ddelta: [dx | acc.ddelta],
          dz: [dz | acc.dz],
          db: [Enum.map(dh, &(&1 * s.dt * s.u)) | acc.db],
          dc: [Enum.map(hn, &(dy * &1)) | acc.dc]
        }
      end)

    # the lists were built from t = L-1 down to 0, so they are in order
    %{
      du: r.du,
      ddelta: r.ddelta,
      dz: r.dz,
      db: r.db,
      dc: r.dc,
      da: r.da,
      dd: r.dd,
      dbias: r.dbias,
      dh0: r.carry
    }
  end

  # ---- math ----------------------------------------------------------------

  def softplus(x) when x > 20, do: x
  def softplus(x), do: log1p(:math.exp(x))

  def sigmoid(x) when x >= 0, do: 1.0 / (1.0 + :math.exp(-x))

  def sigmoid(x) do
    e = :math.exp(x)
    e / (1.0 + e)
  end

  def silu(x), do: x * sigmoid(x)

  # log1p without cancellation for small x: log(1 + x) * x / ((1 + x) - 1)
  defp log1p(x) do
    w = 1.0 + x
    if w == 1.0, do: x, else: :math.log(w) * x / (w - 1.0)
  end

  defp dot(xs, ys), do: Enum.zip_reduce(xs, ys, 0.0, fn x, y, acc -> acc + x * y end)

  # lists of per-channel lists over t -> list over t of lists over channels
  defp transpose(_chans, 0), do: []
  defp transpose([], _len), do: []
  defp transpose(chans, _len), do: Enum.zip_with(chans, & &1)

  defp zip_add2(x, y), do: Enum.zip_with(x, y, fn a, b -> zip_add_any(a, b) end)

  defp zip_add_any(x, y) when is_list(x), do: Enum.zip_with(x, y, &zip_add_any/2)
  defp zip_add_any(x, y), do: x + y
end
