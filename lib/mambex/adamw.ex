defmodule Mambex.AdamW do
  @moduledoc """
  The AdamW optimiser (decoupled weight decay) with optional global
  gradient-norm clipping, run entirely on the parameters' device.

  ## Usage

      opt = Mambex.AdamW.init(params, lr: 1.0e-3, max_grad_norm: 1.0)
      # each training step, with grads holding a gradient for every parameter:
      opt = Mambex.AdamW.step(opt, params, grads)
      # a learning-rate schedule, without waiting for the device:
      opt = Mambex.AdamW.set_lr(opt, 5.0e-4)

  `params` is a map `name => tensor`, a keyword list, or a plain list of
  tensors (then the names are the positions 0, 1, 2...). `step/3` takes the
  parameters and the gradients in the same form, with the same names.

  **The parameters are updated in place**: `step/3` overwrites the memory of
  every parameter tensor (and of the optimiser's `m`, `v` and step counter).
  Every view or copy-free alias of a parameter sees the new values; take a
  copy first if the old values are needed.

  ## Semantics

  One `step/3` is one operation on the device's queue. Over every parameter
  tensor together:

      norm = sqrt(Σ over all tensors of Σ grad²)
      clip = min(1, max_grad_norm / (norm + 1e-6))      (1 without :max_grad_norm)
      t    = step + 1                                   (the device step counter)
      g    = clip · grad
      m    = β1 · m + (1 − β1) · g
      v    = β2 · v + (1 − β2) · g²
      p    = p · (1 − lr · wd) − (lr / (1 − β1ᵗ)) · m / (sqrt(v) / sqrt(1 − β2ᵗ) + eps)

  with `wd = 0` for tensors without decay. The first step uses `t = 1`. The
  step counter and the learning rate live on the device (`{:s, 32}` and
  `{:f, 32}` scalars) and are read there: nothing in `step/3` or `set_lr/2`
  waits for the device. The readers `lr/1`, `step_count/1` and `grad_norm/1`
  do wait (they download a scalar).

  ## Shapes and types

  | tensor | shape | type |
  |---|---|---|
  | each parameter and its gradient | any (the same for both) | `{:f, 32}` |
  | `m`, `v` (held in the state) | the parameter's | `{:f, 32}` |
  | `step` (held) | `{}` | `{:s, 32}` |
  | `lr` (held) | `{}` | `{:f, 32}` |
  | `grad_norm` (held, when computed) | `{}` | `{:f, 32}` |

  All tensors must be on one device (`:cpu` or `{:cuda, i}`). Only `{:f, 32}`
  parameters are taken, on both backends. Empty tensors are allowed.

  ## Options of `init/2`

    * `:lr` — learning rate (default `1.0e-3`)
    * `:betas` — `{β1, β2}` (default `{0.9, 0.999}`), each in `[0, 1)`
    * `:eps` — (default `1.0e-8`), `>= 0`
    * `:weight_decay` — (default `0.01`), `>= 0`
    * `:max_grad_norm` — clip the global gradient norm to this (default
      `nil`: no clipping); a positive number
    * `:grad_norm` — compute the global gradient norm at each step and keep
      it in the state, for `grad_norm/1` (default: `true` when
      `:max_grad_norm` is set, else `false`; it costs one extra read of the
      gradients)
    * `:decay` — which tensors get weight decay: a function
      `fn name, tensor -> boolean end` or a list of names. Default: tensors
      of rank >= 2 (weight matrices), not vectors (biases, norm weights).

  Wrong names, shapes, types or devices, freed tensors, a missing gradient
  and unknown options raise `ArgumentError` naming the parameter.

  ## Numerics

  The per-step coefficients (`lr / (1 − β1ᵗ)`, `1 / sqrt(1 − β2ᵗ)`,
  `1 − lr · wd`, the clip factor) are computed in f64 on the device from the
  f32 learning rate and the step, then rounded to f32 once; each element is
  updated in f32 with every operation rounded separately (no fused
  multiply-add), identically on the CPU and CUDA backends: without clipping
  both give the same bits. The norm's sum of squares is accumulated in f64
  in a fixed order (per tile, then tiles in order): bit-identical from run
  to run and whatever the number of CPU threads. The CPU and CUDA norms are
  grouped differently and may differ in the last bits (so then may the clip
  factor: agreement about 1e-7 relative).

  ## Performance

  On CUDA one step over tensors of up to 64 per launch is one kernel launch
  without the norm and two with it (the sum of squares, then the update);
  the floor is reading p, g, m, v and writing p, m, v (28 bytes per
  parameter). On the CPU the update runs on the thread pool above 128 Ki
  parameters.
  """

  alias Mambex.{NIF, Tensor}

  @enforce_keys [:names, :form, :specs, :m, :v, :decay, :step, :lr, :device]
  defstruct [
    :names,
    :form,
    :specs,
    :m,
    :v,
    :decay,
    :step,
    :lr,
    :grad_norm,
    :device,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1.0e-8,
    weight_decay: 0.01,
    max_grad_norm: nil,
    track_grad_norm: false
  ]

  @typedoc "A parameter name: a map key, a keyword key, or a list position."
  @type name :: term()

  @typedoc "Parameters or gradients: a map, a keyword list or a list of tensors."
  @type tensors :: %{optional(name()) => Tensor.t()} | keyword(Tensor.t()) | [Tensor.t()]

  @typedoc """
  The optimiser state. `m` and `v` are maps `name => tensor`; `step`, `lr`
  and `grad_norm` are device scalars (`grad_norm` is `nil` until the first
  step, or when not computed). The other fields are the hyper-parameters
  and the names, shapes and decay flags the state was made for.
  """
  @type t :: %__MODULE__{
          names: [name()],
          form: :map | :keyword | :list,
          specs: %{name() => {tuple(), Tensor.type()}},
          m: %{name() => Tensor.t()},
          v: %{name() => Tensor.t()},
          decay: %{name() => boolean()},
          step: Tensor.t(),
          lr: Tensor.t(),
          grad_norm: Tensor.t() | nil,
          device: Mambex.device(),
          beta1: float(),
          beta2: float(),
          eps: float(),
          weight_decay: float(),
          max_grad_norm: float() | nil,
          track_grad_norm: boolean()
        }

  @init_opts [:lr, :betas, :eps, :weight_decay, :max_grad_norm, :grad_norm, :decay]

  @doc """
  A new optimiser state for `params` (see the module doc for the options):
  `m` and `v` zeros like each parameter, the step counter 0, on the
  parameters' device. The parameters themselves are not kept.
  """
  @spec init(tensors(), keyword()) :: t()
  def init(params, opts \\ []) do
    opts = validate_opts!(opts)
    {form, pairs} = normalize!(params, "params")

    if pairs == [] do
      raise ArgumentError, "adamw init: params is empty (give at least one tensor)"
    end

    {_, first} = hd(pairs)
    check_tensor!(first, "params", elem(hd(pairs), 0))
    device = first.device

    for {name, t} <- pairs do
      check_tensor!(t, "params", name)

      unless Tensor.live?(t),
        do:
          raise(
            ArgumentError,
            "adamw init: params[#{inspect(name)}] was freed and cannot be used"
          )

      if t.type != {:f, 32},
        do:
          raise(
            ArgumentError,
            "adamw init: params[#{inspect(name)}] must have type {:f, 32}, got: #{inspect(t.type)}"
          )

      if t.device != device,
        do:
          raise(
            ArgumentError,
            "adamw init: params[#{inspect(name)}] is on #{inspect(t.device)} but the first parameter is on #{inspect(device)} (all tensors must be on one device)"
          )
    end

    decay = decay_flags!(opts[:decay], pairs)
    {beta1, beta2} = betas!(Keyword.get(opts, :betas, {0.9, 0.999}))
    eps = nonneg!(Keyword.get(opts, :eps, 1.0e-8), :eps)
    wd = nonneg!(Keyword.get(opts, :weight_decay, 0.01), :weight_decay)
    max_norm = max_norm!(Keyword.get(opts, :max_grad_norm))
    track = Keyword.get(opts, :grad_norm, max_norm != nil)

    unless is_boolean(track),
      do: raise(ArgumentError, "adamw init: :grad_norm must be a boolean, got: #{inspect(track)}")

    lr = lr_tensor!(Keyword.get(opts, :lr, 1.0e-3), device)
    zeros = fn t -> Tensor.zeros(t.shape, type: {:f, 32}, device: device) end

    %__MODULE__{
      names: Enum.map(pairs, &elem(&1, 0)),
      form: form,
      specs: Map.new(pairs, fn {n, t} -> {n, {t.shape, t.type}} end),
      m: Map.new(pairs, fn {n, t} -> {n, zeros.(t)} end),
      v: Map.new(pairs, fn {n, t} -> {n, zeros.(t)} end),
      decay: decay,
      step: Tensor.zeros({}, type: {:s, 32}, device: device),
      lr: lr,
      grad_norm: nil,
      device: device,
      beta1: beta1,
      beta2: beta2,
      eps: eps,
      weight_decay: wd,
      max_grad_norm: max_norm,
      track_grad_norm: track
    }
  end

  @doc """
  One AdamW step: updates every parameter tensor of `params` **in place**
  from `grads` (same names and form as at `init/2`, shapes and types as the
  parameters), and the state's `m`, `v` and step counter with them. Returns
  the state, holding the new gradient norm scalar when it is computed.
  Enqueued only: nothing waits for the device.
  """
  @spec step(t(), tensors(), tensors()) :: t()
  def step(%__MODULE__{} = state, params, grads) do
    {_, ps} = normalize!(params, "params")
    {_, gs} = normalize!(grads, "grads")
    pmap = Map.new(ps)
    gmap = Map.new(gs)
    check_names!(state, pmap, "params", length(ps))
    check_names!(state, gmap, "grads", length(gs))

    plist = Enum.map(state.names, &checked!(pmap, &1, state, "params"))
    glist = Enum.map(state.names, &checked!(gmap, &1, state, "grads"))
    mlist = Enum.map(state.names, &Map.fetch!(state.m, &1))
    vlist = Enum.map(state.names, &Map.fetch!(state.v, &1))
    dlist = Enum.map(state.names, &Map.fetch!(state.decay, &1))
    hyper = {state.beta1, state.beta2, state.eps, state.weight_decay, state.max_grad_norm || 0.0}

    norm =
      try do
        Mambex.retry_oom(fn ->
          NIF.adamw_step(
            plist,
            glist,
            mlist,
            vlist,
            dlist,
            state.step,
            state.lr,
            state.track_grad_norm,
            hyper
          )
        end)
      rescue
        e in ArgumentError ->
          reraise ArgumentError, rename(e.message, state.names), __STACKTRACE__
      end

    %{state | grad_norm: norm}
  end

  def step(other, _params, _grads) do
    raise ArgumentError,
          "adamw_step: state must be a Mambex.AdamW from Mambex.AdamW.init/2, got: #{inspect(other, limit: 5)}"
  end

  @doc """
  Sets the learning rate used by the following steps. `lr` is a number
  (written by an enqueued fill: no waiting) or an `{:f, 32}` tensor of one
  element on the state's device (used as it is, by reference: a schedule
  computed on the device; do not free it while the state uses it).
  """
  @spec set_lr(t(), number() | Tensor.t()) :: t()
  def set_lr(%__MODULE__{} = state, lr), do: %{state | lr: lr_tensor!(lr, state.device)}

  @doc "The learning rate (waits for the device)."
  @spec lr(t()) :: float()
  def lr(%__MODULE__{lr: lr}), do: scalar(lr)

  @doc "The number of steps taken (waits for the device)."
  @spec step_count(t()) :: integer()
  def step_count(%__MODULE__{step: step}), do: scalar(step)

  @doc """
  The global gradient norm of the last step, before clipping (waits for
  the device); `nil` before the first step or when the norm is not computed
  (see the `:grad_norm` option).
  """
  @spec grad_norm(t()) :: float() | nil
  def grad_norm(%__MODULE__{grad_norm: nil}), do: nil
  def grad_norm(%__MODULE__{grad_norm: t}), do: scalar(t)

  # ---- helpers ---------------------------------------------------------------

  defp scalar(%Tensor{} = t) do
    [x] = Tensor.to_flat_list(t)
    x
  end

  defp validate_opts!(opts) do
    unless Keyword.keyword?(opts),
      do:
        raise(ArgumentError, "adamw init: options must be a keyword list, got: #{inspect(opts)}")

    case Keyword.keys(opts) -- @init_opts do
      [] ->
        opts

      bad ->
        raise ArgumentError,
              "adamw init: unknown options #{inspect(bad)} (known: #{inspect(@init_opts)})"
    end
  end

  defp normalize!(%{} = map, _what) when not is_struct(map) do
    {:map, map |> Enum.sort_by(&elem(&1, 0)) |> Enum.to_list()}
  end

  defp normalize!(list, what) when is_list(list) do
    cond do
      list != [] and Keyword.keyword?(list) ->
        keys = Keyword.keys(list)

        if length(Enum.uniq(keys)) != length(keys),
          do: raise(ArgumentError, "adamw: #{what} has repeated names")

        {:keyword, list}

      Enum.all?(list, &match?(%Tensor{}, &1)) ->
        {:list, Enum.with_index(list, fn t, i -> {i, t} end)}

      true ->
        raise ArgumentError,
              "adamw: #{what} must be a map, a keyword list or a list of tensors, got: #{inspect(list, limit: 5)}"
    end
  end

  defp normalize!(other, what) do
    raise ArgumentError,
          "adamw: #{what} must be a map, a keyword list or a list of tensors, got: #{inspect(other, limit: 5)}"
  end

  defp check_tensor!(%Tensor{}, _what, _name), do: :ok

  defp check_tensor!(other, what, name) do
    raise ArgumentError,
          "adamw: #{what}[#{inspect(name)}] must be a Mambex.Tensor, got: #{inspect(other, limit: 5)}"
  end

  defp check_names!(state, map, what, count) do
    case Map.keys(map) -- state.names do
      [] ->
        :ok

      extra ->
        raise ArgumentError,
              "adamw_step: #{what} has names the optimiser was not made for: #{inspect(extra, limit: 10)}"
    end

    if count != map_size(map), do: raise(ArgumentError, "adamw_step: #{what} has repeated names")
  end

  defp checked!(map, name, state, what) do
    t =
      case Map.fetch(map, name) do
        {:ok, t} ->
          t

        :error ->
          raise ArgumentError,
                "adamw_step: #{what} has no tensor for parameter #{inspect(name)}" <>
                  if(what == "grads",
                    do: " (a gradient is required for every parameter)",
                    else: ""
                  )
      end

    check_tensor!(t, what, name)
    {shape, type} = Map.fetch!(state.specs, name)

    cond do
      t.shape != shape ->
        raise ArgumentError,
              "adamw_step: #{what}[#{inspect(name)}] must have shape #{inspect(shape)}, got: #{inspect(t.shape)}"

      t.type != type ->
        raise ArgumentError,
              "adamw_step: #{what}[#{inspect(name)}] must have type #{inspect(type)}, got: #{inspect(t.type)}"

      t.device != state.device ->
        raise ArgumentError,
              "adamw_step: #{what}[#{inspect(name)}] is on #{inspect(t.device)} but the optimiser is on #{inspect(state.device)}"

      true ->
        t
    end
  end

  # The NIF names list entries by position: say which parameter that is.
  defp rename(message, names) do
    names = List.to_tuple(names)

    Regex.replace(~r/\b(params|grads|ms|vs)\[(\d+)\]/, message, fn _, list, i ->
      i = String.to_integer(i)
      label = if i < tuple_size(names), do: inspect(elem(names, i)), else: i
      list = %{"ms" => "m", "vs" => "v"}[list] || list
      "#{list}[#{label}]"
    end)
  end

  defp decay_flags!(nil, pairs),
    do: Map.new(pairs, fn {n, t} -> {n, tuple_size(t.shape) >= 2} end)

  defp decay_flags!(fun, pairs) when is_function(fun, 2) do
    Map.new(pairs, fn {n, t} ->
      case fun.(n, t) do
        b when is_boolean(b) ->
          {n, b}

        other ->
          raise ArgumentError,
                "adamw init: :decay returned #{inspect(other)} for #{inspect(n)} (want a boolean)"
      end
    end)
  end

  defp decay_flags!(names, pairs) when is_list(names) do
    known = Enum.map(pairs, &elem(&1, 0))

    case names -- known do
      [] -> Map.new(pairs, fn {n, _} -> {n, n in names} end)
      bad -> raise ArgumentError, "adamw init: :decay names unknown parameters #{inspect(bad)}"
    end
  end

  defp decay_flags!(other, _pairs) do
    raise ArgumentError,
          "adamw init: :decay must be a function (name, tensor -> boolean) or a list of names, got: #{inspect(other)}"
  end

  defp betas!({b1, b2})
       when is_number(b1) and is_number(b2) and b1 >= 0 and b1 < 1 and b2 >= 0 and b2 < 1,
       do: {b1 * 1.0, b2 * 1.0}

  defp betas!(other),
    do:
      raise(
        ArgumentError,
        "adamw init: :betas must be {beta1, beta2}, each in [0, 1), got: #{inspect(other)}"
      )

  defp nonneg!(x, _key) when is_number(x) and x >= 0, do: x * 1.0

  defp nonneg!(x, key),
    do:
      raise(
        ArgumentError,
        "adamw init: #{inspect(key)} must be a number >= 0, got: #{inspect(x)}"
      )

  defp max_norm!(nil), do: nil
  defp max_norm!(x) when is_number(x) and x > 0, do: x * 1.0

  defp max_norm!(x),
    do:
      raise(
        ArgumentError,
        "adamw init: :max_grad_norm must be nil or a number > 0, got: #{inspect(x)}"
      )

  defp lr_tensor!(lr, device) when is_number(lr) do
    Tensor.fill({}, lr, type: {:f, 32}, device: device)
  end

  defp lr_tensor!(%Tensor{type: {:f, 32}, device: device} = t, device) do
    if Tensor.size(t) != 1,
      do:
        raise(
          ArgumentError,
          "adamw: lr must be a number or an {:f, 32} tensor of one element, got shape #{inspect(t.shape)}"
        )

    t
  end

  defp lr_tensor!(other, device) do
    raise ArgumentError,
          "adamw: lr must be a number or an {:f, 32} tensor of one element on #{inspect(device)}, got: #{inspect(other, limit: 5)}"
  end
end
