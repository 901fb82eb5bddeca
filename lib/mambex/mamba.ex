defmodule Mambex.Mamba do
  @moduledoc """
  The Mamba block (Gu & Dao, 2023), forward and backward, built from the
  device ops: every call is enqueued on the parameters' device without a host
  round trip.

  For an input `x` of shape `{B, L, d_model}`:

      xi    = x · in_proj_x                      {B, L, d_inner}
      z     = x · in_proj_z                      {B, L, d_inner}
      xc    = silu(causal_conv1d(xi) + conv_b)   {B, L, d_inner}   width d_conv
      dbc   = xc · x_proj                        {B, L, dt_rank + 2·d_state}
      dt, b, c = the three column groups of dbc
      delta = dt · dt_proj                       {B, L, d_inner}
      y     = selective_scan(xc, delta, A = -exp(a_log), b, c,
                             d: d, z: z, delta_bias: dt_bias, softplus: true)
      out   = y · out_proj                       {B, L, d_model}

  `in_proj_x` and `in_proj_z` are the two halves of the paper's `in_proj`
  (`d_model → 2·d_inner`), kept as two tensors so that each is a contiguous
  GEMM operand. The projections have no bias, as in the paper's reference.

  ## Parameters (string names, all of the parameter type)

  | name | shape |
  |---|---|
  | `in_proj_x.weight`, `in_proj_z.weight` | `{d_model, d_inner}` |
  | `conv.weight`, `conv.bias` | `{d_inner, d_conv}`, `{d_inner}` |
  | `x_proj.weight` | `{d_inner, dt_rank + 2·d_state}` |
  | `dt_proj.weight`, `dt_proj.bias` | `{dt_rank, d_inner}`, `{d_inner}` |
  | `a_log` | `{d_inner, d_state}` |
  | `d` | `{d_inner}` |
  | `out_proj.weight` | `{d_inner, d_model}` |

  Initialisation follows the paper's reference: projections uniform in
  ±1/sqrt(fan_in), `dt_proj.weight` uniform in ±dt_rank^-½, `dt_proj.bias`
  the inverse softplus of dt = exp(U(log 0.001, log 0.1)) (at least 1e-4),
  S4D-real `a_log[d, n] = log(n + 1)`, `d = 1`, and `out_proj.weight`
  divided by sqrt(n_layers) (the prenorm-residual rescaling).

  ## Recurrent state

  The block carries two tensors from one step to the next (a `t:state/0`,
  `{conv_state, ssm_state}`, both of the parameter type):

    * `conv_state` `{B, d_inner, d_conv - 1}`: the last `d_conv - 1` inputs
      of the convolution (`xi`), oldest first (`Mambex.Conv1d`'s state);
    * `ssm_state` `{B, d_inner, d_state}`: the scan's `h` after the last
      step (`Mambex.Scan`'s state).

  `forward/4` takes an `:initial_state` and returns the final state in its
  context; `step/5` runs one step (L = 1) from a state and returns the next.
  Running a sequence in pieces, or step by step, gives the outputs of one
  `forward/4` over the whole sequence (up to rounding).

  A reset of row `b` at step `t` makes the block behave, for that row, as if
  its sequence started at `t`: the scan state entering `t` is zero and the
  convolution sees zeros, not the inputs before `t`.
  """

  alias Mambex.{Conv1d, Linear, Ops, Scan, Tensor}

  @type params :: %{String.t() => Tensor.t()}

  @typedoc "`{conv_state {B, d_inner, d_conv - 1}, ssm_state {B, d_inner, d_state}}`."
  @type state :: {Tensor.t(), Tensor.t()}

  @typedoc "Block sizes: derived from `d_model` and the defaults of `config/2`."
  @type config :: %{
          d_model: pos_integer(),
          d_inner: pos_integer(),
          d_state: pos_integer(),
          d_conv: pos_integer(),
          dt_rank: pos_integer()
        }

  defmodule Context do
    @moduledoc """
    What `Mambex.Mamba.backward/4` needs from a forward call, and the
    block's final state (`:final_state`, a `t:Mambex.Mamba.state/0`).
    `:conv` is one `Mambex.Conv1d.Context`, or, when the forward had
    resets, a list of `{start, length, keep, context}` pieces of the window
    (see `Mambex.Mamba.forward/4`).
    """
    @enforce_keys [:x, :xc, :dt, :y, :conv, :scan, :a]
    defstruct [:x, :xc, :dt, :y, :conv, :scan, :a, :final_state]
    @type t :: %__MODULE__{}
  end

  @doc """
  The block's sizes. Options: `:d_state` (16), `:d_conv` (4), `:expand` (2),
  `:dt_rank` (`ceil(d_model / 16)`).
  """
  @spec config(pos_integer(), keyword()) :: config()
  def config(d_model, opts \\ []) when is_integer(d_model) and d_model > 0 do
    opts = Keyword.validate!(opts, d_state: 16, d_conv: 4, expand: 2, dt_rank: nil)

    %{
      d_model: d_model,
      d_inner: opts[:expand] * d_model,
      d_state: opts[:d_state],
      d_conv: opts[:d_conv],
      dt_rank: opts[:dt_rank] || div(d_model + 15, 16)
    }
  end

  @doc """
  Fresh parameters for a block of `config` on `device`. Options: `:seed`
  (required), `:type` (`{:f, 32}`), `:n_layers` (1, for the out_proj
  rescaling).
  """
  @spec init(config(), Tensor.device(), keyword()) :: params()
  def init(cfg, device, opts) do
    opts = Keyword.validate!(opts, [:seed, type: {:f, 32}, n_layers: 1])
    seed = opts[:seed] || raise ArgumentError, "Mamba.init: the :seed option is required"
    type = opts[:type]
    %{d_model: dm, d_inner: di, d_state: n, d_conv: w, dt_rank: r} = cfg

    uni = fn shape, bound, k ->
      Tensor.random_uniform(shape,
        seed: seed * 64 + k,
        min: -bound,
        max: bound,
        type: type,
        device: device
      )
    end

    %{
      "in_proj_x.weight" => uni.({dm, di}, 1 / :math.sqrt(dm), 1),
      "in_proj_z.weight" => uni.({dm, di}, 1 / :math.sqrt(dm), 2),
      "conv.weight" => uni.({di, w}, 1 / :math.sqrt(w), 3),
      "conv.bias" => uni.({di}, 1 / :math.sqrt(w), 4),
      "x_proj.weight" => uni.({di, r + 2 * n}, 1 / :math.sqrt(di), 5),
      "dt_proj.weight" => uni.({r, di}, 1 / :math.sqrt(r), 6),
      "dt_proj.bias" => host_tensor(dt_bias_values(di, seed), {di}, type, device),
      "a_log" =>
        host_tensor(for(_d <- 1..di, k <- 1..n, do: :math.log(k)), {di, n}, type, device),
      "d" => Tensor.fill({di}, 1.0, type: type, device: device),
      "out_proj.weight" => uni.({di, dm}, 1 / :math.sqrt(di) / :math.sqrt(opts[:n_layers]), 7)
    }
  end

  # dt = exp(U(log 0.001, log 0.1)) >= 1e-4; bias = softplus^-1(dt).
  defp dt_bias_values(di, seed) do
    state = :rand.seed_s(:exsss, {seed, 7919, 104_729})

    {values, _} =
      Enum.map_reduce(1..di, state, fn _, st ->
        {u, st} = :rand.uniform_s(st)
        dt = max(:math.exp(:math.log(0.001) + u * (:math.log(0.1) - :math.log(0.001))), 1.0e-4)
        {dt + :math.log(-expm1(-dt)), st}
      end)

    values
  end

  defp expm1(x) when abs(x) < 1.0e-5, do: x + x * x / 2
  defp expm1(x), do: :math.exp(x) - 1

  defp host_tensor(values, shape, type, device) do
    bin =
      case type do
        {:f, 64} -> for v <- values, into: <<>>, do: <<v::float-64-native>>
        _ -> for v <- values, into: <<>>, do: <<v::float-32-native>>
      end

    t = Tensor.from_binary(bin, if(type == {:f, 64}, do: {:f, 64}, else: {:f, 32}), shape: shape)
    t = if type in [{:f, 32}, {:f, 64}], do: t, else: Ops.cast(t, type)
    Tensor.to_device(t, device)
  end

  @doc """
  The block's forward on `x` `{B, L, d_model}`. Returns `{out, context}`;
  `context.final_state` is the block's state after the last step.

  Options:

    * `:precision` of the projections (`:fp32` or `:tf32`)
    * `:initial_state` — a `t:state/0` to start from (default zeros)
    * `:reset` — `{B, L}` `{:u, 8}`: where non-zero, that row starts afresh
      at that step (zero scan state, and a convolution that does not see
      the inputs before it). The convolution is then run in pieces split at
      the steps where some row resets (their rows' carried convolution state
      zeroed in between), so the reset is read to the host (a sync on a
      GPU): for the one-step case, use `step/5`.
  """
  @spec forward(params(), config(), Tensor.t(), keyword()) :: {Tensor.t(), Context.t()}
  def forward(p, cfg, x, opts \\ []) do
    opts = Keyword.validate!(opts, [:initial_state, :reset, precision: :fp32])
    {conv_init, ssm_init} = opts[:initial_state] || {nil, nil}
    reset = opts[:reset]

    conv = fn xi ->
      if reset, do: conv_with_resets(xi, p, conv_init, reset), else: conv_whole(xi, p, conv_init)
    end

    block(p, cfg, x, conv, [initial_state: ssm_init, reset: reset], opts[:precision])
  end

  @doc """
  One step of the block: `x` `{B, 1, d_model}` and the block's `state` (a
  `t:state/0`) give `{out, new_state}` with `out` `{B, 1, d_model}`. Equal
  (up to rounding) to the step's output of `forward/4` over the whole
  sequence. Builds no backward context and keeps no scan checkpoints.

  Options: `:precision`; `:reset` — `{B}` `{:u, 8}` (or `nil`): rows where
  it is non-zero start from a zero state before this step.
  """
  @spec step(params(), config(), Tensor.t(), state(), keyword()) :: {Tensor.t(), state()}
  def step(p, cfg, x, {conv_state, ssm_state}, opts \\ []) do
    opts = Keyword.validate!(opts, [:reset, precision: :fp32])
    reset = opts[:reset]
    {b, 1, _} = Tensor.shape(x)

    conv_state =
      if reset,
        do: mask_rows(conv_state, keep_mask(reset, Tensor.type(conv_state))),
        else: conv_state

    conv = fn xi ->
      Conv1d.forward(xi, p["conv.weight"],
        bias: p["conv.bias"],
        silu: true,
        initial_state: conv_state
      )
    end

    scan_opts = [
      initial_state: ssm_state,
      reset: reset && Tensor.reshape(reset, {b, 1}),
      checkpoints: false
    ]

    {out, ctx} = block(p, cfg, x, conv, scan_opts, opts[:precision])
    {out, ctx.final_state}
  end

  # The block around a convolution `conv.(xi) -> {xc, final_state, ctx}`.
  defp block(p, cfg, x, conv, scan_opts, prec) do
    %{d_state: n, dt_rank: r} = cfg
    xi = Linear.forward(x, p["in_proj_x.weight"], precision: prec)
    z = Linear.forward(x, p["in_proj_z.weight"], precision: prec)
    {xc, conv_final, conv_ctx} = conv.(xi)
    dbc = Linear.forward(xc, p["x_proj.weight"], precision: prec)
    dt = Tensor.slice(dbc, -1, 0, r)
    b = Tensor.slice(dbc, -1, r, n)
    c = Tensor.slice(dbc, -1, r + n, n)
    delta = Linear.forward(dt, p["dt_proj.weight"], precision: prec)
    a = Ops.negate(Ops.exp(p["a_log"]))

    {y, h, scan_ctx} =
      Scan.forward(
        xc,
        delta,
        a,
        b,
        c,
        [d: p["d"], z: z, delta_bias: p["dt_proj.bias"], softplus: true] ++ scan_opts
      )

    out = Linear.forward(y, p["out_proj.weight"], precision: prec)

    {out,
     %Context{
       x: x,
       xc: xc,
       dt: dt,
       y: y,
       conv: conv_ctx,
       scan: scan_ctx,
       a: a,
       final_state: {conv_final, h}
     }}
  end

  defp conv_whole(xi, p, init) do
    Conv1d.forward(xi, p["conv.weight"], bias: p["conv.bias"], silu: true, initial_state: init)
  end

  # The convolution over a window with resets: one piece per run of steps
  # between the steps where some row resets; entering a piece, the carried
  # state of the rows that reset there is zeroed. Context: the pieces as
  # `{start, length, keep | nil, conv_context}`.
  defp conv_with_resets(xi, p, init, reset) do
    {bsz, len, _} = Tensor.shape(xi)

    if Tensor.shape(reset) != {bsz, len} or Tensor.type(reset) != {:u, 8} do
      raise ArgumentError,
            "Mamba.forward: reset must be a {#{bsz}, #{len}} {:u, 8} tensor, got: #{inspect(reset)}"
    end

    flags = Tensor.to_binary(reset)
    at = fn row, t -> :binary.at(flags, row * len + t) != 0 end
    rows_at = fn t -> for row <- 0..(bsz - 1)//1, do: at.(row, t) end
    starts = [0 | for(t <- 1..(len - 1)//1, Enum.any?(rows_at.(t)), do: t)]
    ends = tl(starts) ++ [len]
    type = Tensor.type(p["conv.weight"])

    {pieces, final} =
      Enum.zip(starts, ends)
      |> Enum.map_reduce(init, fn {t0, t1}, state ->
        resets = if len > 0, do: rows_at.(t0), else: []

        keep =
          if Enum.any?(resets) do
            values = Enum.map(resets, &if(&1, do: 0.0, else: 1.0))
            host_tensor(values, {bsz}, type, Tensor.device(xi))
          end

        state = if keep && state, do: mask_rows(state, keep), else: state
        {out, final, ctx} = conv_whole(Tensor.slice(xi, 1, t0, t1 - t0), p, state)
        {{t0, t1 - t0, keep, ctx, out}, final}
      end)

    xc =
      case pieces do
        [{_, _, _, _, out}] -> out
        _ -> Tensor.concatenate(Enum.map(pieces, &elem(&1, 4)), 1)
      end

    {xc, final, Enum.map(pieces, fn {t0, n, keep, ctx, _} -> {t0, n, keep, ctx} end)}
  end

  # keep {B} of `type`: 1 where reset is zero, 0 elsewhere.
  defp keep_mask(reset, type) do
    Ops.subtract(1, Ops.minimum(Ops.cast(reset, type), 1))
  end

  # state {B, ...} with row b multiplied by keep[b] ({B}).
  defp mask_rows(state, keep) do
    shape = Tensor.shape(state)
    bsz = elem(shape, 0)
    inner = div(Tensor.size(state), max(bsz, 1))

    if inner == 0 or bsz == 0 do
      state
    else
      state
      |> Tensor.reshape({bsz, inner})
      |> Tensor.transpose()
      |> Ops.multiply(keep)
      |> Tensor.transpose()
      |> Tensor.reshape(shape)
    end
  end

  @doc """
  The block's backward: given `d_out` `{B, L, d_model}`, returns
  `{dx, grads}` with a gradient for every parameter. Options: `:precision`;
  `:into` — a map of gradient buffers (by parameter name) to add into; the
  returned map is the one to use afterwards (buffers that the ops cannot add
  into in place are replaced by their sum).
  """
  @spec backward(params(), config(), Context.t(), Tensor.t(), keyword()) ::
          {Tensor.t(), params()}
  def backward(p, _cfg, %Context{} = ctx, d_out, opts \\ []) do
    prec = Keyword.get(opts, :precision, :fp32)
    into = Keyword.get(opts, :into)

    # dx_into: a fresh tensor of x's shape that dx is added to in place (the
    # sum of two branches' input gradients without an add)
    lin = fn x, name, dy, dx_into ->
      w_into = if into, do: %{w: into[name]}, else: %{}
      x_into = if dx_into, do: %{x: dx_into}, else: %{}
      all_into = Map.merge(w_into, x_into)

      Linear.backward(x, p[name], dy,
        precision: prec,
        into: if(map_size(all_into) > 0, do: all_into, else: nil)
      )
    end

    g_out = lin.(ctx.y, "out_proj.weight", d_out, nil)
    gs = Scan.backward(ctx.scan, g_out.x)
    # A = -exp(a_log): dA/da_log = A
    d_a_log = Ops.multiply(gs.a, ctx.a)
    g_dt = lin.(ctx.dt, "dt_proj.weight", gs.delta, nil)
    d_dbc = Tensor.concatenate([g_dt.x, gs.b, gs.c], -1)
    # dxc = du (the scan's) + x_proj's input gradient
    g_x = lin.(ctx.xc, "x_proj.weight", d_dbc, gs.u)
    dxc = g_x.x

    g_conv = conv_backward(ctx.conv, dxc, into)

    g_ix = lin.(ctx.x, "in_proj_x.weight", g_conv.x, nil)
    # dx = both in_proj branches' input gradients
    g_iz = lin.(ctx.x, "in_proj_z.weight", gs.z, g_ix.x)
    dx = g_iz.x

    grads = %{
      "in_proj_x.weight" => g_ix.w,
      "in_proj_z.weight" => g_iz.w,
      "conv.weight" => g_conv.weight,
      "conv.bias" => g_conv.bias,
      "x_proj.weight" => g_x.w,
      "dt_proj.weight" => g_dt.w,
      "dt_proj.bias" => add_into(into, "dt_proj.bias", gs.delta_bias),
      "a_log" => add_into(into, "a_log", d_a_log),
      "d" => add_into(into, "d", gs.d),
      "out_proj.weight" => g_out.w
    }

    {dx, grads}
  end

  # One convolution without an initial state: accumulate in place.
  defp conv_backward(%Conv1d.Context{initial_state: nil} = c, dxc, into) do
    Conv1d.backward(c, dxc, into: into && %{weight: into["conv.weight"], bias: into["conv.bias"]})
  end

  defp conv_backward(%Conv1d.Context{} = c, dxc, into) do
    g = Conv1d.backward(c, dxc)

    %{
      g
      | weight: add_into(into, "conv.weight", g.weight),
        bias: add_into(into, "conv.bias", g.bias)
    }
  end

  # Pieces split at resets, last to first: the gradient of a piece's
  # initial state (masked like the state was) is the previous piece's
  # final-state gradient; the initial state of the first piece is a
  # constant (the gradient w.r.t. a given state is not returned).
  defp conv_backward(pieces, dxc, into) when is_list(pieces) do
    {dxs, w, bias, _} =
      pieces
      |> Enum.reverse()
      |> Enum.reduce({[], nil, nil, nil}, fn {t0, n, keep, c}, {dxs, w, bias, d_final} ->
        g = Conv1d.backward(c, Tensor.slice(dxc, 1, t0, n), d_final_state: d_final)

        d_init =
          case g do
            %{initial_state: d} when keep != nil -> mask_rows(d, keep)
            %{initial_state: d} -> d
            _ -> nil
          end

        {[g.x | dxs], sum(w, g.weight), sum(bias, g.bias), d_init}
      end)

    dx = if length(dxs) == 1, do: hd(dxs), else: Tensor.concatenate(dxs, 1)
    %{x: dx, weight: add_into(into, "conv.weight", w), bias: add_into(into, "conv.bias", bias)}
  end

  defp sum(nil, g), do: g
  defp sum(acc, g), do: Ops.add(acc, g)

  defp add_into(nil, _name, g), do: g
  defp add_into(into, name, g), do: Ops.add(into[name], g)
end
