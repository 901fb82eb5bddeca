defmodule Mambex.Model do
  @moduledoc """
  A stack of Mamba blocks that trains on the device from Elixir.

      h_0  = features · in.weight + in.bias              {B, L, d_model}
      for each layer l:  n_l = RMSNorm(s_l),  s_l = s_{l-1} + m_{l-1}  (s_0 = h_0)
                         m_l = Mamba_l(n_l)
      n_f  = RMSNorm(s_{last} + m_{last})
      out  = n_f · head.weight + head.bias               {B, L, outputs}

  (the pre-norm residual stack of the Mamba paper, with the residual add fused
  into the norm that follows it).

  Parameters live on one device in a map from string names to tensors
  (`"in.weight"`, `"layers.0.norm.weight"`, `"layers.0.mixer.a_log"`, …,
  `"norm_f.weight"`, `"head.weight"`, `"head.bias"`). Every op of
  `forward/3`, `backward/4` and `train_step/5` is enqueued on that device:
  nothing waits for the GPU until a result is read.

  `train_step/5` runs forward, softmax cross-entropy, backward, global
  gradient-norm clipping and AdamW, and returns the loss as a device scalar.
  """

  alias Mambex.{AdamW, Linear, Loss, Mamba, Norm, Ops, Tensor}

  @enforce_keys [:config, :params, :device]
  defstruct [:config, :params, :device]

  @type t :: %__MODULE__{
          config: map(),
          params: %{String.t() => Tensor.t()},
          device: Tensor.device()
        }

  defmodule Context do
    @moduledoc "What `Mambex.Model.backward/4` needs from a forward call."
    @enforce_keys [:inputs, :first_norm, :layers, :final_norm, :n_f]
    defstruct [:inputs, :first_norm, :layers, :final_norm, :n_f]
    @type t :: %__MODULE__{}
  end

  @doc """
  A new model. Options:

    * `:features` (required) — input features per step
    * `:outputs` (required) — classes (or values) per step
    * `:d_model` (256), `:n_layers` (2), `:d_state` (16), `:d_conv` (4),
      `:expand` (2), `:dt_rank` (`ceil(d_model / 16)`)
    * `:eps` — RMSNorm epsilon (1e-5)
    * `:seed` (required), `:device` (`:cpu`), `:type` (`{:f, 32}`)
  """
  @spec new(keyword()) :: t()
  def new(opts) do
    opts =
      Keyword.validate!(opts, [
        :features,
        :outputs,
        :seed,
        d_model: 256,
        n_layers: 2,
        d_state: 16,
        d_conv: 4,
        expand: 2,
        dt_rank: nil,
        eps: 1.0e-5,
        device: :cpu,
        type: {:f, 32}
      ])

    for k <- [:features, :outputs, :seed] do
      unless is_integer(opts[k]) and opts[k] >= 0,
        do: raise(ArgumentError, "Model.new: #{inspect(k)} must be a non-negative integer, got: #{inspect(opts[k])}")
    end

    dm = opts[:d_model]
    block = Mamba.config(dm, Keyword.take(opts, [:d_state, :d_conv, :expand, :dt_rank]))

    cfg = %{
      features: opts[:features],
      outputs: opts[:outputs],
      d_model: dm,
      n_layers: opts[:n_layers],
      eps: opts[:eps],
      type: opts[:type],
      block: block
    }

    %__MODULE__{config: cfg, params: init_params(cfg, opts[:seed], opts[:device]), device: opts[:device]}
  end

  defp init_params(cfg, seed, device) do
    type = cfg.type
    dm = cfg.d_model

    uni = fn shape, fan_in, k ->
      b = 1 / :math.sqrt(fan_in)
      Tensor.random_uniform(shape, seed: seed * 1024 + k, min: -b, max: b, type: type, device: device)
    end

    ones = fn shape -> Tensor.fill(shape, 1.0, type: type, device: device) end

    layers =
      for l <- 0..(cfg.n_layers - 1)//1, reduce: %{} do
        acc ->
          block =
            Mamba.init(cfg.block, device, seed: seed * 1024 + 16 + l, type: type, n_layers: cfg.n_layers)

          acc
          |> Map.put("layers.#{l}.norm.weight", ones.({dm}))
          |> Map.merge(Map.new(block, fn {k, v} -> {"layers.#{l}.mixer.#{k}", v} end))
      end

    Map.merge(layers, %{
      "in.weight" => uni.({cfg.features, dm}, cfg.features, 1),
      "in.bias" => uni.({dm}, cfg.features, 2),
      "norm_f.weight" => ones.({dm}),
      "head.weight" => uni.({dm, cfg.outputs}, dm, 3),
      "head.bias" => uni.({cfg.outputs}, dm, 4)
    })
  end

  defp block_params(params, l) do
    prefix = "layers.#{l}.mixer."
    size = byte_size(prefix)

    for {k, v} <- params, String.starts_with?(k, prefix), into: %{} do
      {binary_part(k, size, byte_size(k) - size), v}
    end
  end

  @doc """
  Forward over `inputs` `{B, L, features}`. Returns `{outputs, context}`
  with outputs `{B, L, outputs}`. Options: `:precision` (`:fp32` or `:tf32`)
  of the linear layers.
  """
  @spec forward(t(), Tensor.t(), keyword()) :: {Tensor.t(), Context.t()}
  def forward(%__MODULE__{config: cfg, params: p}, inputs, opts \\ []) do
    prec = Keyword.get(opts, :precision, :fp32)
    eps = cfg.eps
    h0 = Linear.forward(inputs, p["in.weight"], bias: p["in.bias"], precision: prec)
    {n0, first_norm} = Norm.rms_norm(h0, p["layers.0.norm.weight"], eps: eps)
    {m0, ctx0} = Mamba.forward(block_params(p, 0), cfg.block, n0, precision: prec)

    {m_last, s_last, layers} =
      Enum.reduce(1..(cfg.n_layers - 1)//1, {m0, h0, [{nil, ctx0}]}, fn l, {m, s, acc} ->
        {n, s_new, nctx} = Norm.add_rms_norm(m, s, p["layers.#{l}.norm.weight"], eps: eps)
        {m_new, bctx} = Mamba.forward(block_params(p, l), cfg.block, n, precision: prec)
        {m_new, s_new, [{nctx, bctx} | acc]}
      end)

    {n_f, _s_f, final_norm} = Norm.add_rms_norm(m_last, s_last, p["norm_f.weight"], eps: eps)
    out = Linear.forward(n_f, p["head.weight"], bias: p["head.bias"], precision: prec)

    ctx = %Context{
      inputs: inputs,
      first_norm: first_norm,
      layers: Enum.reverse(layers),
      final_norm: final_norm,
      n_f: n_f
    }

    {out, ctx}
  end

  @doc """
  Gradients of every parameter given `d_out` (the gradient of the forward's
  outputs). Options: `:precision`; `:into` — gradient buffers (a map by
  parameter name, e.g. from an earlier call) to add into, for gradient
  accumulation over micro-batches. Returns the gradient map (use it rather
  than `:into` afterwards: a few small buffers are replaced by their sums).
  """
  @spec backward(t(), Context.t(), Tensor.t(), keyword()) :: %{String.t() => Tensor.t()}
  def backward(%__MODULE__{config: cfg, params: p}, %Context{} = ctx, d_out, opts \\ []) do
    prec = Keyword.get(opts, :precision, :fp32)
    into = Keyword.get(opts, :into)
    sub = fn names -> into && Map.new(names, fn {k, name} -> {k, into[name]} end) end

    g_head =
      Linear.backward(ctx.n_f, p["head.weight"], d_out,
        bias: true,
        precision: prec,
        into: sub.(w: "head.weight", bias: "head.bias")
      )

    g_f = Norm.backward(ctx.final_norm, g_head.x, into: sub.(weight: "norm_f.weight"))

    grads = %{
      "head.weight" => g_head.w,
      "head.bias" => g_head.bias,
      "norm_f.weight" => g_f.weight
    }

    # ds: the gradient reaching the residual stream s_l (= d m_l as well).
    {ds, grads} =
      (cfg.n_layers - 1)..0//-1
      |> Enum.zip(Enum.reverse(ctx.layers))
      |> Enum.reduce({g_f.x, grads}, fn {l, {nctx, bctx}}, {ds, grads} ->
        prefix = "layers.#{l}.mixer."
        block_into = into && block_params(into, l)
        {dn, bgrads} = Mamba.backward(block_params(p, l), cfg.block, bctx, ds, precision: prec, into: block_into)
        grads = Map.merge(grads, Map.new(bgrads, fn {k, v} -> {prefix <> k, v} end))
        norm_name = "layers.#{l}.norm.weight"

        if l == 0 do
          g_n = Norm.backward(ctx.first_norm, dn, into: sub.(weight: norm_name))
          {Ops.add(g_n.x, ds), Map.put(grads, norm_name, g_n.weight)}
        else
          g_n = Norm.backward(nctx, dn, d_sum: ds, into: sub.(weight: norm_name))
          {g_n.x, Map.put(grads, norm_name, g_n.weight)}
        end
      end)

    g_in =
      Linear.backward(ctx.inputs, p["in.weight"], ds,
        bias: true,
        input_grad: false,
        precision: prec,
        into: sub.(w: "in.weight", bias: "in.bias")
      )

    Map.merge(grads, %{"in.weight" => g_in.w, "in.bias" => g_in.bias})
  end

  @doc """
  Softmax cross-entropy of the outputs against `targets` `{B, L}` `{:s, 32}`
  (steps whose target is `ignore_index`, default -1, count for nothing: use
  it for padding or to train on the last step only), and the gradients.
  Returns `{loss, grads}` with `loss` a device scalar. Options: `:precision`,
  `:ignore_index`, `:scale` (multiplies loss and gradients; e.g. 1/k for k
  micro-batches), `:into` (see `backward/4`).
  """
  @spec loss_and_grad(t(), Tensor.t(), Tensor.t(), keyword()) ::
          {Tensor.t(), %{String.t() => Tensor.t()}}
  def loss_and_grad(model, inputs, targets, opts \\ []) do
    opts = Keyword.validate!(opts, [:into, precision: :fp32, ignore_index: -1, scale: 1.0])
    {out, ctx} = forward(model, inputs, precision: opts[:precision])
    {b, l, c} = Tensor.shape(out)

    {loss, dlogits} =
      Loss.cross_entropy(Tensor.reshape(out, {b * l, c}), Tensor.reshape(targets, {b * l}),
        ignore_index: opts[:ignore_index],
        scale: opts[:scale]
      )

    grads =
      backward(model, ctx, Tensor.reshape(dlogits, {b, l, c}),
        precision: opts[:precision],
        into: opts[:into]
      )

    {loss, grads}
  end

  @doc """
  A fresh AdamW state for the model's parameters (options as
  `Mambex.AdamW.init/2`).
  """
  @spec optimizer(t(), keyword()) :: AdamW.t()
  def optimizer(%__MODULE__{params: p}, opts \\ []), do: AdamW.init(p, opts)

  @doc """
  One training step: forward, loss, backward, clipping and AdamW, all on the
  device. Returns `{model, optimizer_state, loss}` (the parameters are
  updated in place; the loss is a device scalar: reading it waits for the
  step). Options as `loss_and_grad/4`.
  """
  @spec train_step(t(), AdamW.t(), Tensor.t(), Tensor.t(), keyword()) ::
          {t(), AdamW.t(), Tensor.t()}
  def train_step(%__MODULE__{} = model, opt, inputs, targets, opts \\ []) do
    {loss, grads} = loss_and_grad(model, inputs, targets, opts)
    opt = AdamW.step(opt, model.params, grads)
    {model, opt, loss}
  end
end
