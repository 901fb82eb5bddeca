defmodule Mambex.Stepper do
  @moduledoc """
  Real-time stepping of a `Mambex.Model`: one call per frame, frame bytes
  in, logits bytes out.

      stepper = Mambex.Stepper.new(model, 1)
      {logits, stepper} = Mambex.Stepper.step(stepper, frame_bytes)

  `frame_bytes` holds `batch * features` native-endian f32 values (row after
  row, one row per agent) and `logits` `batch * outputs` of them. The
  recurrent state lives in the stepper, on the model's device, and is
  updated in place by every step: a stepper is a handle, not a value (use
  the one `step/3` returns, and step one stepper from one process at a time).

  On a CUDA device with a model that `Mambex.Model.fused?/1` accepts and a
  batch of at most 8 (or with `fused: true`), the stepper holds a captured
  plan: the whole model's step (one persistent kernel, which reads the
  frame from and writes the logits to pinned host memory) recorded once as
  a CUDA graph and replayed per frame, so a frame is one NIF call. Elsewhere (the
  CPU, other types) it runs `Mambex.Model.step/4` op by op. Either way the
  logits are those of `Mambex.Model.forward/3` over the sequence so far (up
  to rounding).

  A frame with another number of rows than the stepper's batch re-captures
  the plan for the new batch, from a zero state (new sequences for every
  row); `update_model/2` swaps the parameters (e.g. after training) keeping
  the state. `free/1` releases the device memory at once (otherwise it goes
  when the stepper is garbage collected).
  """

  alias Mambex.{Model, NIF, Tensor}

  # :auto captures plans up to this batch; above it the op-by-op step (with
  # cuBLASLt products) measured faster on the H200 (256 agents: fused plan
  # 400 us a frame, ops ~250)
  @graph_rows 8

  @enforce_keys [:model, :batch, :mode]
  defstruct [:model, :batch, :mode, :plan, :state, blocks: 0, step_channels: 0, fused: :auto]

  @type t :: %__MODULE__{
          model: Model.t(),
          batch: pos_integer(),
          mode: :graph | :ops,
          plan: reference() | nil,
          state: Model.State.t(),
          blocks: non_neg_integer(),
          step_channels: integer()
        }

  @doc """
  A stepper for `batch` agents at a time, starting from zero states.

  Options: `:state` — a `Mambex.Model.State` of that batch to start from
  (copied; the given one is not changed); `:fused` — `:auto` (the default:
  the captured plan where possible and the batch is at most 8), `true` (insist: ArgumentError where
  impossible) or `false` (op by op). For tuning (the defaults, 0, let the
  backend choose: the cluster kernel for one agent, the step kernel for up
  to 8): `:blocks` — run the general fused kernel with this many
  persistent blocks; `:step_channels` — run the step kernel (batch <= 8)
  with this many channels of `d_inner` per block, or -1 for the general
  kernel.
  """
  @spec new(Model.t(), pos_integer(), keyword()) :: t()
  def new(%Model{} = model, batch, opts \\ []) do
    opts = Keyword.validate!(opts, [:state, fused: :auto, blocks: 0, step_channels: 0])

    unless is_integer(batch) and batch >= 1,
      do: raise(ArgumentError, "Stepper.new: batch must be a positive integer, got: #{inspect(batch)}")

    unless is_integer(opts[:blocks]) and opts[:blocks] in 0..4096,
      do: raise(ArgumentError, "Stepper.new: :blocks must be an integer in 0..4096, got: #{inspect(opts[:blocks])}")

    unless is_integer(opts[:step_channels]) and opts[:step_channels] in -1..64,
      do: raise(ArgumentError, "Stepper.new: :step_channels must be an integer in -1..64, got: #{inspect(opts[:step_channels])}")

    unless opts[:fused] in [:auto, true, false],
      do: raise(ArgumentError, "Stepper.new: :fused must be :auto, true or false, got: #{inspect(opts[:fused])}")

    if opts[:fused] == true and not Model.fused?(model),
      do: raise(ArgumentError, "Stepper.new: fused: true needs a CUDA {:f, 32} model within the fused limits (see Model.fused?/1)")

    state = initial_state(model, batch, opts[:state])
    with_mode(%__MODULE__{
      model: model,
      batch: batch,
      mode: :ops,
      state: state,
      blocks: opts[:blocks],
      step_channels: opts[:step_channels],
      fused: opts[:fused]
    })
  end

  # Picks the plan or the op path for the stepper's batch (capturing a plan).
  defp with_mode(%__MODULE__{model: model, batch: batch, fused: fused} = s) do
    graph = fused == true or (fused == :auto and Model.fused?(model) and batch <= @graph_rows)
    if graph, do: capture(%{s | mode: :graph}), else: %{s | mode: :ops}
  end

  defp initial_state(model, batch, nil), do: Model.init_state(model, batch)

  defp initial_state(model, batch, %Model.State{batch: batch, layers: layers}) do
    zero = Model.init_state(model, batch)

    layers =
      Enum.zip_with(layers, zero.layers, fn {c, s}, {zc, zs} ->
        for {t, z} <- [{c, zc}, {s, zs}] do
          if Tensor.shape(t) != Tensor.shape(z) or Tensor.type(t) != Tensor.type(z) or Tensor.device(t) != Tensor.device(z),
            do: raise(ArgumentError, "Stepper.new: :state does not fit the model (#{inspect(Tensor.shape(t))} vs #{inspect(Tensor.shape(z))})")
        end

        # a copy, so that the caller's state is never written
        {Mambex.Ops.add(c, zc), Mambex.Ops.add(s, zs)}
      end)

    if length(layers) != length(zero.layers),
      do: raise(ArgumentError, "Stepper.new: :state has #{length(layers)} layers, the model #{length(zero.layers)}")

    %Model.State{batch: batch, layers: layers}
  end

  defp initial_state(_model, batch, other),
    do: raise(ArgumentError, "Stepper.new: :state must be a Mambex.Model.State of batch #{batch}, got: #{inspect(other, limit: 5)}")

  defp capture(%__MODULE__{model: model, state: state, blocks: blocks, step_channels: sc} = s) do
    {cfg_t, top, layers} = Model.fused_args(model, blocks, sc)
    %{s | plan: NIF.infer_plan_new(cfg_t, top, layers, state.layers)}
  end

  @doc """
  One frame: `frames` is a binary of `rows * features` native f32 values,
  `rows` agents' frames. Returns `{logits, stepper}` with `logits` a binary
  of `rows * outputs` native f32 values.

  Options: `:reset` — `nil` or a binary of `rows` bytes; a non-zero byte
  starts that row afresh (zero state) before this frame.

  A frame of another row count than the stepper's batch makes a new plan
  for that batch, from zero states.
  """
  @spec step(t(), binary(), keyword()) :: {binary(), t()}
  def step(stepper, frames, opts \\ [])

  def step(%__MODULE__{} = s, frames, opts) when is_binary(frames) do
    reset = Keyword.validate!(opts, [:reset])[:reset]
    f = s.model.config.features
    row_bytes = 4 * f

    rows =
      if rem(byte_size(frames), row_bytes) == 0 and byte_size(frames) > 0,
        do: div(byte_size(frames), row_bytes),
        else: raise(ArgumentError, "Stepper.step: frames must be a non-empty binary of rows of #{f} f32 values (#{row_bytes} bytes a row), got #{byte_size(frames)} bytes")

    unless is_nil(reset) or (is_binary(reset) and byte_size(reset) == rows),
      do: raise(ArgumentError, "Stepper.step: :reset must be nil or a binary of #{rows} bytes, got: #{inspect(reset, limit: 5)}")

    s = if rows == s.batch, do: s, else: rebatch(s, rows)

    case s.mode do
      :graph ->
        {NIF.infer_plan_step(s.plan, frames, reset), s}

      :ops ->
        device = s.model.device
        x = frames |> Tensor.from_binary({:f, 32}, shape: {rows, f}) |> Tensor.to_device(device)
        r = reset && reset |> Tensor.from_binary({:u, 8}, shape: {rows}) |> Tensor.to_device(device)
        {logits, state} = Model.step(s.model, s.state, x, reset: r, fused: false)
        {Tensor.to_binary(logits), %{s | state: state}}
    end
  end

  def step(%__MODULE__{}, frames, _opts),
    do: raise(ArgumentError, "Stepper.step: frames must be a binary, got: #{inspect(frames, limit: 5)}")

  defp rebatch(%__MODULE__{} = s, rows) do
    free(s)
    with_mode(%{s | batch: rows, state: Model.init_state(s.model, rows), plan: nil})
  end

  @doc """
  The stepper with the parameters of `model` (same configuration and
  device), keeping its state: e.g. after training steps. Re-captures the
  plan.
  """
  @spec update_model(t(), Model.t()) :: t()
  def update_model(%__MODULE__{model: old} = s, %Model{} = model) do
    if model.config != old.config or model.device != old.device,
      do: raise(ArgumentError, "Stepper.update_model: the model must have the stepper's configuration and device")

    if s.plan, do: NIF.infer_plan_free(s.plan)
    s = %{s | model: model, plan: nil}
    if s.mode == :graph, do: capture(s), else: s
  end

  @doc """
  The current state (a `Mambex.Model.State` of the stepper's batch). On the
  captured path these are the tensors the plan updates in place: copy them
  (e.g. `Mambex.Ops.add(t, 0)`) to keep a snapshot.
  """
  @spec state(t()) :: Model.State.t()
  def state(%__MODULE__{state: state}), do: state

  @doc """
  `%{mode: :graph | :ops, batch:, graphed:, device_bytes:, kernel:}`:
  `graphed` is false when the driver refused to record the plan as a CUDA
  graph (the plan then launches its kernel per frame); `kernel` is
  `:cluster` (one row: one thread-block cluster exchanging partial sums
  through its shared memory), `:step` (the kernel for one step of a few
  rows), `:general` or, op by op, `nil`.
  """
  @spec info(t()) :: map()
  def info(%__MODULE__{mode: :graph, plan: plan, batch: b}) do
    {^b, graphed, bytes, _live, kernel} = NIF.infer_plan_info(plan)
    %{mode: :graph, batch: b, graphed: graphed, device_bytes: bytes, kernel: kernel}
  end

  def info(%__MODULE__{mode: :ops, batch: b}), do: %{mode: :ops, batch: b, graphed: false, device_bytes: 0, kernel: nil}

  @doc "Releases the plan's device memory now (the stepper cannot step after it)."
  @spec free(t()) :: :ok
  def free(%__MODULE__{plan: nil}), do: :ok
  def free(%__MODULE__{plan: plan}), do: NIF.infer_plan_free(plan)
end
