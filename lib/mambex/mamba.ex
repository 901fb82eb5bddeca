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
  """

  alias Mambex.{Conv1d, Linear, Ops, Scan, Tensor}

  @type params :: %{String.t() => Tensor.t()}

  @typedoc "Block sizes: derived from `d_model` and the defaults of `config/2`."
  @type config :: %{
          d_model: pos_integer(),
          d_inner: pos_integer(),
          d_state: pos_integer(),
          d_conv: pos_integer(),
          dt_rank: pos_integer()
        }

  defmodule Context do
    @moduledoc "What `Mambex.Mamba.backward/4` needs from a forward call."
    @enforce_keys [:x, :xc, :dt, :y, :conv, :scan, :a]
    defstruct [:x, :xc, :dt, :y, :conv, :scan, :a]
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
      "out_proj.weight" =>
        uni.({di, dm}, 1 / :math.sqrt(di) / :math.sqrt(opts[:n_layers]), 7)
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
  The block's forward on `x` `{B, L, d_model}`. Returns `{out, context}`.
  Options: `:precision` of the projections (`:fp32` or `:tf32`).
  """
  @spec forward(params(), config(), Tensor.t(), keyword()) :: {Tensor.t(), Context.t()}
  def forward(p, cfg, x, opts \\ []) do
    prec = Keyword.get(opts, :precision, :fp32)
    %{d_state: n, dt_rank: r} = cfg
    xi = Linear.forward(x, p["in_proj_x.weight"], precision: prec)
    z = Linear.forward(x, p["in_proj_z.weight"], precision: prec)
    {xc, _state, conv_ctx} = Conv1d.forward(xi, p["conv.weight"], bias: p["conv.bias"], silu: true)
    dbc = Linear.forward(xc, p["x_proj.weight"], precision: prec)
    dt = Tensor.slice(dbc, -1, 0, r)
    b = Tensor.slice(dbc, -1, r, n)
    c = Tensor.slice(dbc, -1, r + n, n)
    delta = Linear.forward(dt, p["dt_proj.weight"], precision: prec)
    a = Ops.negate(Ops.exp(p["a_log"]))

    {y, _h, scan_ctx} =
      Scan.forward(xc, delta, a, b, c,
        d: p["d"],
        z: z,
        delta_bias: p["dt_proj.bias"],
        softplus: true
      )

    out = Linear.forward(y, p["out_proj.weight"], precision: prec)
    {out, %Context{x: x, xc: xc, dt: dt, y: y, conv: conv_ctx, scan: scan_ctx, a: a}}
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

    lin = fn x, name, dy, input? ->
      Linear.backward(x, p[name], dy,
        precision: prec,
        input_grad: input?,
        into: into && %{w: into[name]}
      )
    end

    g_out = lin.(ctx.y, "out_proj.weight", d_out, true)
    gs = Scan.backward(ctx.scan, g_out.x)
    # A = -exp(a_log): dA/da_log = A
    d_a_log = Ops.multiply(gs.a, ctx.a)
    g_dt = lin.(ctx.dt, "dt_proj.weight", gs.delta, true)
    d_dbc = Tensor.concatenate([g_dt.x, gs.b, gs.c], -1)
    g_x = lin.(ctx.xc, "x_proj.weight", d_dbc, true)
    dxc = Ops.add(gs.u, g_x.x)

    g_conv =
      Conv1d.backward(ctx.conv, dxc,
        into: into && %{weight: into["conv.weight"], bias: into["conv.bias"]}
      )

    g_ix = lin.(ctx.x, "in_proj_x.weight", g_conv.x, true)
    g_iz = lin.(ctx.x, "in_proj_z.weight", gs.z, true)
    dx = Ops.add(g_ix.x, g_iz.x)

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

  defp add_into(nil, _name, g), do: g
  defp add_into(into, name, g), do: Ops.add(into[name], g)
end
