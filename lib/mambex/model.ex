defmodule Mambex.Model do
  import Bitwise, only: [<<<: 2]
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

  ## Inference: windows and steps

  Each layer carries a recurrent state (`Mambex.Mamba`'s convolution and
  scan states), held for the whole stack in a `Mambex.Model.State`:
  `init_state/2` makes a zero one; `forward_with_state/3` runs a window
  `{B, L, features}` from a state and returns the state after it; `step/4`
  runs one frame `{B, features}` and returns the logits `{B, outputs}` and
  the next state. Stepping frame by frame, or a window then steps, gives
  the outputs of `forward/3` over the whole sequence (up to rounding:
  the tests hold the relative error to 1e-5 in f32 and 1e-12 in f64).

  A reset (`:reset` of `step/4`, per row; of `forward/3` and
  `forward_with_state/3`, per row and step) makes the model behave, for
  that row, as if its sequence started at that step (for many agents
  stepped at once, each starting new episodes at its own time).
  """

  alias Mambex.{AdamW, Checkpoint, Linear, Loss, Mamba, Norm, Ops, Tensor}
  alias Mambex.NIF

  @enforce_keys [:config, :params, :device]
  defstruct [:config, :params, :device]

  @type t :: %__MODULE__{
          config: map(),
          params: %{String.t() => Tensor.t()},
          device: Tensor.device()
        }

  defmodule Context do
    @moduledoc """
    What `Mambex.Model.backward/4` needs from a forward call, and the
    model's recurrent state after the last step (`:final_state`, a
    `Mambex.Model.State`).
    """
    @enforce_keys [:inputs, :first_norm, :layers, :final_norm, :n_f]
    defstruct [:inputs, :first_norm, :layers, :final_norm, :n_f, :final_state]
    @type t :: %__MODULE__{}
  end

  defmodule State do
    @moduledoc """
    The recurrent state of a `Mambex.Model` for a batch of `batch`
    sequences: per layer (first to last) a `{conv_state, ssm_state}`
    (`{batch, d_inner, d_conv - 1}` and `{batch, d_inner, d_state}`, of the
    model's type, on its device; see `Mambex.Mamba`). A state is a value:
    `Mambex.Model.step/4` returns a new one and leaves the old one as it was.
    """
    @enforce_keys [:batch, :layers]
    defstruct [:batch, :layers]

    @type t :: %__MODULE__{
            batch: non_neg_integer(),
            layers: [{Mambex.Tensor.t(), Mambex.Tensor.t()}]
          }
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
  with outputs `{B, L, outputs}`; `context.final_state` is the recurrent
  state after the last step (see `forward_with_state/3`).

  Options:

    * `:precision` (`:fp32` or `:tf32`) of the linear layers
    * `:state` — a `Mambex.Model.State` of batch `B` to start from (default
      zeros: the sequences start at step 0). `backward/4` treats it as a
      constant (no gradient flows into it).
    * `:reset` — `{B, L}` `{:u, 8}` (or `nil`): where non-zero, that row
      starts afresh at that step: zero scan state, and convolutions that do
      not see the row's inputs before the step (they run in pieces split
      at the steps where some row resets: the reset is read to the host,
      which waits for the device). `backward/4` gives the gradients of this
      forward, resets included.
  """
  @spec forward(t(), Tensor.t(), keyword()) :: {Tensor.t(), Context.t()}
  def forward(%__MODULE__{config: cfg} = model, inputs, opts \\ []) do
    opts = validate!(opts, [:state, :reset, precision: :fp32], "forward")
    {b, l} = check_inputs!(model, inputs)
    check_state!(model, opts[:state], b, "forward")
    reset = opts[:reset]
    check_flags!(model, reset, {b, l}, "forward", "reset")
    initial = if opts[:state], do: opts[:state].layers, else: List.duplicate(nil, cfg.n_layers)
    prec = opts[:precision]

    block = fn l, p, n ->
      Mamba.forward(p, cfg.block, n, precision: prec, initial_state: Enum.at(initial, l), reset: reset)
    end

    {out, first_norm, layers, final_norm, n_f} = stack(model, inputs, prec, block)

    ctx = %Context{
      inputs: inputs,
      first_norm: first_norm,
      layers: layers,
      final_norm: final_norm,
      n_f: n_f,
      final_state: %State{batch: b, layers: Enum.map(layers, fn {_, bctx} -> bctx.final_state end)}
    }

    {out, ctx}
  end

  @doc """
  `forward/3` for inference: returns `{outputs, final_state}`, e.g. to run
  a window of frames and then continue with `step/4` (or another window)
  from `final_state`. Options as `forward/3` (`:state`, `:reset`,
  `:precision`), and `:fused` (see below).

  ## The fused path

  On a CUDA device, an `{:f, 32}` model within the fused limits (see
  `fused?/1`) runs the whole window in one persistent kernel when
  `B * L <= 8` (`fused: :auto`, the default; above that the op-by-op
  path, with cuBLASLt products, measured faster): every product in exact
  fp32 whatever `:precision` says, and resets handled on the device (no
  host read). `fused: true` insists (ArgumentError when the model or device
  cannot), `fused: false` always runs the op-by-op forward.
  """
  @spec forward_with_state(t(), Tensor.t(), keyword()) :: {Tensor.t(), State.t()}
  def forward_with_state(model, inputs, opts \\ []) do
    opts = validate!(opts, [:state, :reset, precision: :fp32, fused: :auto], "forward_with_state")
    {b, l} = check_inputs!(model, inputs)

    if use_fused?(model, opts[:fused], b * l, "forward_with_state") do
      check_tensor!(inputs, model, "forward_with_state", "inputs")
      check_state!(model, opts[:state], b, "forward")
      check_flags!(model, opts[:reset], {b, l}, "forward_with_state", "reset")
      {cfg_t, top, layers} = fused_args(model, 0)
      states = if opts[:state], do: opts[:state].layers, else: nil
      {out, new_states} = NIF.infer(cfg_t, top, layers, inputs, opts[:reset], states, false)
      {out, %State{batch: b, layers: new_states}}
    else
      {out, ctx} = forward(model, inputs, Keyword.delete(opts, :fused))
      {out, ctx.final_state}
    end
  end

  # measured on the H200 (bench/results/model_step.csv): fused wins for a
  # step of a few rows (the step kernel: 33.4 vs 78.9 us for the 2-layer
  # step at one row) and loses at 60 rows (173 vs 145) and 256 (344 vs 199):
  # the general kernel's products are SIMT tiles, not cuBLAS GEMMs
  @fused_rows 8

  @doc """
  Whether `model` can run on the fused inference path (`step/4`,
  `forward_with_state/3`, `Mambex.Stepper`): a CUDA device, type
  `{:f, 32}`, at most 16 layers, `d_state <= 32`,
  `d_conv <= 8`, and `features`, `d_model`, `d_inner` and
  `dt_rank + 2 d_state` at most 2048.
  """
  @spec fused?(t()) :: boolean()
  def fused?(%__MODULE__{config: cfg, device: device}) do
    %{d_inner: di, d_state: n, d_conv: w, dt_rank: r} = cfg.block

    match?({:cuda, _}, device) and cfg.type == {:f, 32} and cfg.n_layers in 1..16 and n <= 32 and
      w <= 8 and Enum.all?([cfg.features, cfg.d_model, di, r + 2 * n], &(&1 <= 2048))
  end

  defp use_fused?(model, mode, rows, fun) do
    case mode do
      :auto -> rows in 1..@fused_rows and fused?(model)
      false -> false
      true ->
        fused?(model) ||
          raise ArgumentError,
                "Model.#{fun}: fused: true needs a CUDA {:f, 32} model within the fused limits (see Model.fused?/1)"

      other ->
        raise ArgumentError, "Model.#{fun}: :fused must be :auto, true or false, got: #{inspect(other)}"
    end
  end

  @doc false
  # {cfg, top, layers} of the fused NIFs.
  # blocks > 0: the general kernel with that many blocks; step_channels > 0:
  # the step kernel with that many channels a block, -1: never it.
  def fused_args(%__MODULE__{config: cfg, params: p}, blocks, step_channels \\ 0) do
    %{d_inner: di, d_state: n, d_conv: w, dt_rank: r} = cfg.block

    cfg_t = {cfg.features, cfg.d_model, di, n, w, r, cfg.outputs, cfg.eps, blocks, step_channels}
    top = [p["in.weight"], p["in.bias"], p["norm_f.weight"], p["head.weight"], p["head.bias"]]

    layers =
      for l <- 0..(cfg.n_layers - 1)//1 do
        m = "layers.#{l}.mixer."

        [p["layers.#{l}.norm.weight"]] ++
          Enum.map(
            ~w(in_proj_x.weight in_proj_z.weight conv.weight conv.bias x_proj.weight dt_proj.weight dt_proj.bias a_log d out_proj.weight),
            &p[m <> &1]
          )
      end

    {cfg_t, top, layers}
  end

  @doc """
  A zero recurrent state for `batch` sequences, on the model's device and of
  its type: what a sequence starts from.
  """
  @spec init_state(t(), non_neg_integer()) :: State.t()
  def init_state(%__MODULE__{config: cfg, device: device}, batch) when is_integer(batch) and batch >= 0 do
    %{d_inner: di, d_conv: w, d_state: n} = cfg.block
    zeros = fn shape -> Tensor.zeros(shape, type: cfg.type, device: device) end
    %State{batch: batch, layers: for(_ <- 1..cfg.n_layers//1, do: {zeros.({batch, di, w - 1}), zeros.({batch, di, n})})}
  end

  def init_state(%__MODULE__{}, batch),
    do: raise(ArgumentError, "Model.init_state: batch must be a non-negative integer, got: #{inspect(batch)}")

  @doc """
  One step of the model for one new frame per sequence: `frame`
  `{B, features}` (or `{B, 1, features}`), of the model's type and on its
  device, and `state` (batch `B`, from `init_state/2`, `forward_with_state/3`
  or a previous step) give `{logits, new_state}`: `logits` is
  `{B, outputs}` (`{B, 1, outputs}` for a `{B, 1, features}` frame), equal
  up to rounding to this step's outputs of `forward/3` over the whole
  sequence. `state` is not changed. Nothing waits for the device.

  Options:

    * `:reset` — `{B}` `{:u, 8}` (or `nil`): rows where it is non-zero
      start from a zero state before this frame (a new sequence for that
      row; the other rows continue)
    * `:precision` (`:fp32` or `:tf32`)
    * `:fused` (`:auto`, `true`, `false`): as in `forward_with_state/3`;
      with `:auto`, a CUDA `{:f, 32}` model steps up to 8 rows in one
      fused kernel launch (exact fp32)

  For the lowest latency per frame (one NIF call: frame bytes in, logits
  bytes out, a replayed CUDA graph), see `Mambex.Stepper`.

  Wrong frames, states or resets raise `ArgumentError` naming the argument.
  """
  @spec step(t(), State.t(), Tensor.t(), keyword()) :: {Tensor.t(), State.t()}
  def step(%__MODULE__{config: cfg} = model, state, frame, opts \\ []) do
    opts = validate!(opts, [:reset, precision: :fp32, fused: :auto], "step")
    {b, x} = check_frame!(model, frame)
    check_state!(model, state, b, "step")
    check_flags!(model, opts[:reset], {b}, "step", "reset")
    prec = opts[:precision]

    {out, layers} =
      if use_fused?(model, opts[:fused], b, "step") do
        {cfg_t, top, layers} = fused_args(model, 0)
        reset = opts[:reset] && Tensor.reshape(opts[:reset], {b, 1})
        NIF.infer(cfg_t, top, layers, x, reset, state.layers, false)
      else
        block = fn l, p, n ->
          Mamba.step(p, cfg.block, n, Enum.at(state.layers, l), precision: prec, reset: opts[:reset])
        end

        {out, _, layers, _, _} = stack(model, x, prec, block)
        {out, Enum.map(layers, &elem(&1, 1))}
      end

    out = if tuple_size(frame.shape) == 2, do: Tensor.reshape(out, {b, cfg.outputs}), else: out
    {out, %State{batch: b, layers: layers}}
  end

  # The stack around `block.(l, block_params, normed) -> {m, result}`:
  # returns {out, first_norm, [{norm_ctx | nil, result}], final_norm, n_f}.
  defp stack(%__MODULE__{config: cfg, params: p}, inputs, prec, block) do
    eps = cfg.eps
    h0 = Linear.forward(inputs, p["in.weight"], bias: p["in.bias"], precision: prec)
    {n0, first_norm} = Norm.rms_norm(h0, p["layers.0.norm.weight"], eps: eps)
    {m0, r0} = block.(0, block_params(p, 0), n0)

    {m_last, s_last, layers} =
      Enum.reduce(1..(cfg.n_layers - 1)//1, {m0, h0, [{nil, r0}]}, fn l, {m, s, acc} ->
        {n, s_new, nctx} = Norm.add_rms_norm(m, s, p["layers.#{l}.norm.weight"], eps: eps)
        {m_new, r} = block.(l, block_params(p, l), n)
        {m_new, s_new, [{nctx, r} | acc]}
      end)

    {n_f, _s_f, final_norm} = Norm.add_rms_norm(m_last, s_last, p["norm_f.weight"], eps: eps)
    out = Linear.forward(n_f, p["head.weight"], bias: p["head.bias"], precision: prec)
    {out, first_norm, Enum.reverse(layers), final_norm, n_f}
  end

  defp validate!(opts, allowed, fun) do
    unless Keyword.keyword?(opts),
      do: raise(ArgumentError, "Model.#{fun}: options must be a keyword list, got: #{inspect(opts, limit: 5)}")

    try do
      Keyword.validate!(opts, allowed)
    rescue
      e in ArgumentError -> reraise ArgumentError, "Model.#{fun}: #{Exception.message(e)}", __STACKTRACE__
    end
  end

  defp check_tensor!(t, model, fun, name, type \\ nil)

  defp check_tensor!(%Tensor{} = t, %__MODULE__{config: cfg, device: device}, fun, name, type) do
    type = type || cfg.type

    cond do
      Tensor.type(t) != type ->
        raise ArgumentError, "Model.#{fun}: #{name} must be of type #{inspect(type)}, got: #{inspect(Tensor.type(t))}"

      Tensor.device(t) != device ->
        raise ArgumentError,
              "Model.#{fun}: #{name} must be on the model's device #{inspect(device)}, got: #{inspect(Tensor.device(t))}"

      true ->
        t
    end
  end

  defp check_tensor!(other, _model, fun, name, _type),
    do: raise(ArgumentError, "Model.#{fun}: #{name} must be a Mambex.Tensor, got: #{inspect(other, limit: 5)}")

  # The type and device of the inputs are left to the ops (as before).
  defp check_inputs!(%__MODULE__{config: cfg}, inputs) do
    unless match?(%Tensor{}, inputs),
      do: raise(ArgumentError, "Model.forward: inputs must be a Mambex.Tensor, got: #{inspect(inputs, limit: 5)}")

    case Tensor.shape(inputs) do
      {b, l, f} when f == cfg.features -> {b, l}
      s -> raise ArgumentError, "Model.forward: inputs must be {batch, length, #{cfg.features}}, got: #{inspect(s)}"
    end
  end

  defp check_frame!(%__MODULE__{config: cfg} = model, frame) do
    check_tensor!(frame, model, "step", "frame")
    f = cfg.features

    case Tensor.shape(frame) do
      {b, ^f} -> {b, Tensor.reshape(frame, {b, 1, f})}
      {b, 1, ^f} -> {b, frame}
      s -> raise ArgumentError, "Model.step: frame must be {batch, #{f}} or {batch, 1, #{f}}, got: #{inspect(s)}"
    end
  end

  defp check_state!(_model, nil, _b, "forward"), do: :ok

  defp check_state!(%__MODULE__{config: cfg} = model, %State{batch: b, layers: layers}, b, fun)
       when is_list(layers) and length(layers) == cfg.n_layers do
    %{d_inner: di, d_conv: w, d_state: n} = cfg.block

    Enum.each(layers, fn
      {conv, ssm} ->
        for {t, shape, what} <- [{conv, {b, di, w - 1}, "conv"}, {ssm, {b, di, n}, "ssm"}] do
          check_tensor!(t, model, fun, "state (#{what} state)")

          if Tensor.shape(t) != shape,
            do: raise(ArgumentError, "Model.#{fun}: state (#{what} state) must be #{inspect(shape)}, got: #{inspect(Tensor.shape(t))}")
        end

      other ->
        raise ArgumentError, "Model.#{fun}: state layers must be {conv_state, ssm_state} tuples, got: #{inspect(other, limit: 5)}"
    end)
  end

  defp check_state!(%__MODULE__{config: cfg}, state, b, fun) do
    raise ArgumentError,
          "Model.#{fun}: state must be a Mambex.Model.State of batch #{b} with #{cfg.n_layers} layers " <>
            "(from init_state/2), got: #{inspect(state, limit: 5)}"
  end

  defp check_flags!(_model, nil, _shape, _fun, _name), do: :ok

  defp check_flags!(model, flags, shape, fun, name) do
    check_tensor!(flags, model, fun, name, {:u, 8})

    if Tensor.shape(flags) != shape,
      do: raise(ArgumentError, "Model.#{fun}: #{name} must be #{inspect(shape)} {:u, 8}, got: #{inspect(Tensor.shape(flags))}")
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

  # ---- save and load -------------------------------------------------------

  @doc """
  The name, shape and type of every parameter of a model with `config`
  (what `new/1` creates and `load/2` expects).
  """
  @spec param_specs(map()) :: %{String.t() => {tuple(), Tensor.type()}}
  def param_specs(cfg) do
    %{d_model: dm, features: f, outputs: o, type: type} = cfg
    %{d_inner: di, d_state: n, d_conv: w, dt_rank: r} = cfg.block

    block = %{
      "in_proj_x.weight" => {dm, di},
      "in_proj_z.weight" => {dm, di},
      "conv.weight" => {di, w},
      "conv.bias" => {di},
      "x_proj.weight" => {di, r + 2 * n},
      "dt_proj.weight" => {r, di},
      "dt_proj.bias" => {di},
      "a_log" => {di, n},
      "d" => {di},
      "out_proj.weight" => {di, dm}
    }

    layers =
      for l <- 0..(cfg.n_layers - 1)//1,
          {k, shape} <- Map.put(Map.new(block, fn {k, v} -> {"mixer." <> k, v} end), "norm.weight", {dm}),
          into: %{},
          do: {"layers.#{l}.#{k}", shape}

    Map.merge(layers, %{
      "in.weight" => {f, dm},
      "in.bias" => {dm},
      "norm_f.weight" => {dm},
      "head.weight" => {dm, o},
      "head.bias" => {o}
    })
    |> Map.new(fn {k, shape} -> {k, {shape, type}} end)
  end

  @doc """
  Saves the model's configuration and parameters, and the optimizer state
  when given, to `path` (format: `Mambex.Checkpoint`). Tensors are named
  `param/<name>`, `adamw.m/<name>`, `adamw.v/<name>`, `adamw.step`,
  `adamw.lr`; numbers `model.*` and `adamw.*`. Reads the tensors (waits for
  the device).
  """
  @spec save(Path.t(), t(), AdamW.t() | nil) :: :ok | {:error, term()}
  def save(path, %__MODULE__{config: cfg, params: p}, opt \\ nil) do
    b = cfg.block

    numbers = %{
      "format.model" => 1,
      "model.features" => cfg.features,
      "model.outputs" => cfg.outputs,
      "model.d_model" => cfg.d_model,
      "model.n_layers" => cfg.n_layers,
      "model.d_state" => b.d_state,
      "model.d_conv" => b.d_conv,
      "model.d_inner" => b.d_inner,
      "model.dt_rank" => b.dt_rank,
      "model.eps" => cfg.eps / 1,
      "model.f64" => if(cfg.type == {:f, 64}, do: 1, else: 0)
    }

    tensors = Map.new(p, fn {k, v} -> {"param/" <> k, v} end)

    {tensors, numbers} =
      case opt do
        nil ->
          {tensors, numbers}

        %AdamW{} = o ->
          t =
            tensors
            |> Map.merge(Map.new(o.m, fn {k, v} -> {"adamw.m/" <> k, v} end))
            |> Map.merge(Map.new(o.v, fn {k, v} -> {"adamw.v/" <> k, v} end))
            |> Map.merge(%{"adamw.step" => o.step, "adamw.lr" => o.lr})

          n =
            numbers
            |> Map.merge(%{
              "adamw.beta1" => o.beta1 / 1,
              "adamw.beta2" => o.beta2 / 1,
              "adamw.eps" => o.eps / 1,
              "adamw.weight_decay" => o.weight_decay / 1,
              "adamw.max_grad_norm" => (o.max_grad_norm || 0.0) / 1,
              "adamw.track_grad_norm" => if(o.track_grad_norm, do: 1, else: 0)
            })
            |> Map.merge(Map.new(o.decay, fn {k, v} -> {"adamw.decay/" <> k, if(v, do: 1, else: 0)} end))

          {t, n}
      end

    Checkpoint.write(path, tensors, numbers)
  end

  @doc """
  Loads a file written by `save/3` onto `device`: `{:ok, model, optimizer
  | nil}` or `{:error, reason}`. Every name, shape, type and number is
  checked against the configuration the file declares before anything is
  used; a truncated or corrupt file is an error, never a crash, and no
  atom is made from its contents.
  """
  @spec load(Path.t(), Tensor.device()) :: {:ok, t(), AdamW.t() | nil} | {:error, String.t()}
  def load(path, device \\ :cpu) do
    with {:ok, tensors, numbers} <- Checkpoint.read(path, device),
         {:ok, cfg} <- config_from(numbers),
         {:ok, params} <- take_params(tensors, cfg),
         {:ok, opt} <- take_optimizer(tensors, numbers, params, cfg) do
      {:ok, %__MODULE__{config: cfg, params: params, device: device}, opt}
    end
  end

  defp int(numbers, key, min, max) do
    case Map.fetch(numbers, key) do
      {:ok, v} when is_integer(v) and v >= min and v <= max -> {:ok, v}
      {:ok, v} -> {:error, "#{key} = #{inspect(v)} is out of range #{min}..#{max}"}
      :error -> {:error, "#{key} is missing"}
    end
  end

  defp float(numbers, key, min, max) do
    case Map.fetch(numbers, key) do
      {:ok, v} when is_float(v) and v >= min and v <= max -> {:ok, v}
      {:ok, v} -> {:error, "#{key} = #{inspect(v)} is not a float in [#{min}, #{max}]"}
      :error -> {:error, "#{key} is missing"}
    end
  end

  defp config_from(nums) do
    big = 1 <<< 20

    with {:ok, 1} <- int(nums, "format.model", 1, 1),
         {:ok, f} <- int(nums, "model.features", 1, big),
         {:ok, o} <- int(nums, "model.outputs", 1, big),
         {:ok, dm} <- int(nums, "model.d_model", 1, big),
         {:ok, nl} <- int(nums, "model.n_layers", 1, 1024),
         {:ok, n} <- int(nums, "model.d_state", 1, 256),
         {:ok, w} <- int(nums, "model.d_conv", 1, 8),
         {:ok, di} <- int(nums, "model.d_inner", 1, big),
         {:ok, r} <- int(nums, "model.dt_rank", 1, big),
         {:ok, eps} <- float(nums, "model.eps", 0.0, 1.0),
         {:ok, f64} <- int(nums, "model.f64", 0, 1) do
      {:ok,
       %{
         features: f,
         outputs: o,
         d_model: dm,
         n_layers: nl,
         eps: eps,
         type: if(f64 == 1, do: {:f, 64}, else: {:f, 32}),
         block: %{d_model: dm, d_inner: di, d_state: n, d_conv: w, dt_rank: r}
       }}
    end
  end

  defp take_params(tensors, cfg) do
    specs = param_specs(cfg)

    Enum.reduce_while(specs, {:ok, %{}}, fn {name, {shape, type}}, {:ok, acc} ->
      case Map.fetch(tensors, "param/" <> name) do
        {:ok, %Tensor{shape: ^shape, type: ^type} = t} ->
          {:cont, {:ok, Map.put(acc, name, t)}}

        {:ok, t} ->
          {:halt, {:error, "param/#{name} has shape #{inspect(t.shape)} and type #{inspect(t.type)}, expected #{inspect(shape)} #{inspect(type)}"}}

        :error ->
          {:halt, {:error, "param/#{name} is missing"}}
      end
    end)
    |> case do
      {:ok, params} ->
        extra = for "param/" <> k <- Map.keys(tensors), not Map.has_key?(specs, k), do: k
        if extra == [], do: {:ok, params}, else: {:error, "unexpected parameters #{inspect(Enum.take(extra, 5))}"}

      error ->
        error
    end
  end

  defp take_optimizer(tensors, numbers, params, cfg) do
    if not Map.has_key?(tensors, "adamw.step") do
      {:ok, nil}
    else
      with :ok <- (cfg.type == {:f, 32} && :ok) || {:error, "an optimizer state needs {:f, 32} parameters"},
           {:ok, b1} <- float(numbers, "adamw.beta1", 0.0, 1.0),
           {:ok, b2} <- float(numbers, "adamw.beta2", 0.0, 1.0),
           {:ok, eps} <- float(numbers, "adamw.eps", 0.0, 1.0),
           {:ok, wd} <- float(numbers, "adamw.weight_decay", 0.0, 1.0e6),
           {:ok, mn} <- float(numbers, "adamw.max_grad_norm", 0.0, 1.0e30),
           {:ok, track} <- int(numbers, "adamw.track_grad_norm", 0, 1),
           {:ok, decay} <- decay_names(numbers, params),
           {:ok, step} <- scalar_tensor(tensors, "adamw.step", {:s, 32}),
           {:ok, lr} <- scalar_tensor(tensors, "adamw.lr", {:f, 32}),
           {:ok, m} <- moments(tensors, "adamw.m/", params),
           {:ok, v} <- moments(tensors, "adamw.v/", params) do
        opt =
          AdamW.init(params,
            betas: {b1, b2},
            eps: eps,
            weight_decay: wd,
            max_grad_norm: if(mn > 0, do: mn),
            grad_norm: track == 1 or mn > 0,
            decay: decay
          )

        {:ok, %{opt | m: m, v: v, step: step, lr: lr}}
      end
    end
  end

  defp decay_names(numbers, params) do
    Enum.reduce_while(Map.keys(params), {:ok, []}, fn name, {:ok, acc} ->
      case int(numbers, "adamw.decay/" <> name, 0, 1) do
        {:ok, 1} -> {:cont, {:ok, [name | acc]}}
        {:ok, 0} -> {:cont, {:ok, acc}}
        error -> {:halt, error}
      end
    end)
  end

  defp scalar_tensor(tensors, key, type) do
    case Map.fetch(tensors, key) do
      {:ok, %Tensor{shape: {}, type: ^type} = t} -> {:ok, t}
      {:ok, _} -> {:error, "#{key} must be a {} #{inspect(type)} tensor"}
      :error -> {:error, "#{key} is missing"}
    end
  end

  defp moments(tensors, prefix, params) do
    Enum.reduce_while(params, {:ok, %{}}, fn {name, %Tensor{shape: shape}}, {:ok, acc} ->
      case Map.fetch(tensors, prefix <> name) do
        {:ok, %Tensor{shape: ^shape, type: {:f, 32}} = t} -> {:cont, {:ok, Map.put(acc, name, t)}}
        {:ok, _} -> {:halt, {:error, "#{prefix}#{name} does not match its parameter"}}
        :error -> {:halt, {:error, "#{prefix}#{name} is missing"}}
      end
    end)
  end
end
