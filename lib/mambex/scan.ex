defmodule Mambex.Scan do
  @moduledoc """
  The Mamba-1 selective scan, forward and backward.

  ## Semantics

  For batch `b`, step `t`, channel `d` (in group `g(d) = div(d, div(D, G))`)
  and state `n`:

      delta'  = delta[b,t,d] + delta_bias[d]                (delta_bias optional)
      Δ       = softplus(delta') = log1p(exp(delta')), or delta' where delta' > 20
                (Δ = delta' with softplus: false)
      h_t[n]  = exp(Δ·A[d,n])·h_{t-1}[n] + Δ·B[b,t,g(d),n]·u[b,t,d]
      y       = Σ_n C[b,t,g(d),n]·h_t[n] + D[d]·u[b,t,d]    (D optional)
      out     = y·silu(z[b,t,d]) = y·z·sigmoid(z)           (z optional; else out = y)

  with `h_{-1} = initial_state[b,d,:]` (zeros when not given). Where
  `reset[b,t]` is non-zero, the state entering step `t` is zero (an episode
  boundary inside a sequence); the gradient does not flow back past it.
  The final state `h_{L-1}` is returned, so a sequence can be run in pieces:
  running the first half and then the second half with `initial_state:` the
  first half's final state gives the same outputs as one call, and passing
  the second half's `initial_state` gradient back as `d_final_state:` of the
  first half gives the same gradients.

  ## Shapes and types

  | argument | shape | type |
  |---|---|---|
  | `u`, `delta`, `z`, output, `d_out` | `{batch, length, channels}` = `{B, L, D}` | io |
  | `a` | `{D, N}`, `1 <= N <= 256` | param |
  | `b`, `c` | `{B, L, N}`, or grouped `{B, L, G, N}` with `rem(D, G) == 0` (both the same) | io |
  | `:d`, `:delta_bias` | `{D}` | param |
  | `:initial_state`, final state, `:d_final_state` | `{B, D, N}` | param |
  | `:reset` | `{B, L}` | `{:u, 8}` |

  On the CPU, io is `{:f, 32}` or `{:f, 64}` and param is the same type. On
  CUDA, io is `{:f, 32}`, `{:bf, 16}` or `{:f, 16}` and param is `{:f, 32}`.
  All tensors must be on one device. `B`, `L` or `D` may be 0: the outputs
  are then empty and the final state is the initial state (or zeros).

  Wrong shapes, types or devices, freed tensors and unknown options raise
  `ArgumentError` naming the argument.

  ## Numerics

  The recurrence is computed, accumulated and carried in fp32 (fp64 for f64
  io) whatever the io type, and every reduction (over states, over the
  channels of a group for the `b`/`c` gradients, over batch and time for
  `a`, `d`, `delta_bias`) runs in a fixed order: results are bit-identical
  from run to run on one device, whatever the number of threads.

  Against a float64 reference, the relative error `‖out − ref‖ / ‖ref‖` is
  at most 1e-5 for f32 forward outputs (L up to a few thousand) and 1e-4 for
  f32 gradients; about 1e-2 with bf16 io. The f32 CPU path evaluates exp,
  softplus and sigmoid with inline polynomial approximations of relative
  error below 1e-6 (values under 2.7e-38 flush to zero).

  ## Performance

  The CPU path runs the recurrence sequentially over `L`, vectorised across
  blocks of 16 channels of one group (SSE, AVX2 or AVX-512, picked at run
  time; all three give the same bits) and threaded over (batch, channel
  block) on a persistent pool of one thread per online CPU. The backward
  saves nothing from the forward: it recomputes the states, in chunks of at
  most ~512 KiB per thread. A CPU scan that finds the pool busy with another
  call runs on its caller's thread. On the 2-core CI machine, f32 with `z`,
  `D`, `delta_bias` and softplus at B = 32, L = 60, D = 512, N = 16 runs
  the forward in about 9 ms (10 GFLOP/s counting 6 flops per (b, t, d, n))
  and forward + backward in about 28 ms (`bench/scan_bench_test.exs`).
  """

  alias Mambex.NIF
  alias Mambex.Tensor

  defmodule Context do
    @moduledoc """
    What `Mambex.Scan.backward/3` needs from a forward call: the input
    tensors, the options and, where the backend keeps them, `:checkpoints`
    (the states every few steps, so that the backward need not re-run the
    forward; on CUDA for N = 16 they take `B·⌈L/8⌉·D·16` floats). Keeping a
    context keeps these tensors alive.
    """
    @enforce_keys [:u, :delta, :a, :b, :c, :softplus]
    defstruct [
      :u,
      :delta,
      :a,
      :b,
      :c,
      :d,
      :z,
      :delta_bias,
      :initial_state,
      :reset,
      :checkpoints,
      softplus: true
    ]

    @type t :: %__MODULE__{
            u: Tensor.t(),
            delta: Tensor.t(),
            a: Tensor.t(),
            b: Tensor.t(),
            c: Tensor.t(),
            d: Tensor.t() | nil,
            z: Tensor.t() | nil,
            delta_bias: Tensor.t() | nil,
            initial_state: Tensor.t() | nil,
            reset: Tensor.t() | nil,
            checkpoints: Tensor.t() | nil,
            softplus: boolean()
          }
  end

  @type gradients :: %{
          required(:u) => Tensor.t(),
          required(:delta) => Tensor.t(),
          required(:a) => Tensor.t(),
          required(:b) => Tensor.t(),
          required(:c) => Tensor.t(),
          optional(:d) => Tensor.t(),
          optional(:z) => Tensor.t(),
          optional(:delta_bias) => Tensor.t(),
          optional(:initial_state) => Tensor.t()
        }

  @forward_opts [:d, :z, :delta_bias, :initial_state, :reset, softplus: true, checkpoints: true]

  @doc """
  Runs the scan. Returns `{out, final_state, context}`.

    * `u`, `delta` — `{B, L, D}`, io type
    * `a` — `{D, N}`, param type (negative values make the state decay)
    * `b`, `c` — `{B, L, N}` or `{B, L, G, N}`, io type

  Options:

    * `:d` — `{D}` skip weight (param type)
    * `:z` — `{B, L, D}` gate: `out = y * silu(z)` (io type)
    * `:delta_bias` — `{D}` added to `delta` before the softplus (param type)
    * `:softplus` — apply softplus to `delta` (default `true`)
    * `:initial_state` — `{B, D, N}` state entering step 0 (param type; default zeros)
    * `:reset` — `{B, L}` `{:u, 8}`: non-zero zeroes the state entering that step
    * `:checkpoints` — keep the states every few steps in the context, where
      the backend uses them, so that `backward/3` skips re-running the
      forward (default `true`; `false` saves their memory)

  `out` is `{B, L, D}` (io type), `final_state` `{B, D, N}` (param type).
  """
  @spec forward(Tensor.t(), Tensor.t(), Tensor.t(), Tensor.t(), Tensor.t(), keyword()) ::
          {Tensor.t(), Tensor.t(), Context.t()}
  def forward(u, delta, a, b, c, opts \\ []) do
    opts = validate_opts!(opts, @forward_opts, "forward")

    ctx = %Context{
      u: u,
      delta: delta,
      a: a,
      b: b,
      c: c,
      d: opts[:d],
      z: opts[:z],
      delta_bias: opts[:delta_bias],
      initial_state: opts[:initial_state],
      reset: opts[:reset],
      softplus: opts[:softplus]
    }

    {out, final_state, checkpoints} =
      Mambex.retry_oom(fn ->
        NIF.scan_forward(
          u,
          delta,
          a,
          b,
          c,
          ctx.d,
          ctx.z,
          ctx.delta_bias,
          ctx.softplus,
          ctx.initial_state,
          ctx.reset,
          opts[:checkpoints]
        )
      end)

    {out, final_state, %{ctx | checkpoints: checkpoints}}
  end

  @doc """
  Gradients of a scan given the gradient of its output.

    * `context` — from `forward/6`
    * `d_out` — `{B, L, D}`, io type: the gradient of `out`

  Options:

    * `:d_final_state` — `{B, D, N}` (param type): the gradient of the final
      state (default zeros), e.g. the `:initial_state` gradient of the next
      piece of a split sequence

  Returns a map with the gradient of each input that was given, in its shape
  and type: `:u`, `:delta`, `:a`, `:b`, `:c` always; `:d`, `:z`,
  `:delta_bias` and `:initial_state` when those were given to `forward/6`.
  (`:reset` and `:softplus` have none.)
  """
  @spec backward(Context.t(), Tensor.t(), keyword()) :: gradients()
  def backward(context, d_out, opts \\ [])

  def backward(%Context{} = ctx, d_out, opts) do
    opts = validate_opts!(opts, [:d_final_state], "backward")

    Mambex.retry_oom(fn ->
      NIF.scan_backward(
        ctx.u,
        ctx.delta,
        ctx.a,
        ctx.b,
        ctx.c,
        ctx.d,
        ctx.z,
        ctx.delta_bias,
        ctx.softplus,
        ctx.initial_state,
        ctx.reset,
        d_out,
        opts[:d_final_state],
        ctx.checkpoints
      )
    end)
  end

  def backward(other, _d_out, _opts) do
    raise ArgumentError,
          "scan_backward: context must be a Mambex.Scan.Context from Mambex.Scan.forward/6, " <>
            "got: #{inspect(other, limit: 5)}"
  end

  defp validate_opts!(opts, allowed, fun) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError,
            "scan_#{fun}: options must be a keyword list, got: #{inspect(opts, limit: 5)}"
    end

    try do
      Keyword.validate!(opts, allowed)
    rescue
      e in ArgumentError ->
        reraise ArgumentError, "scan_#{fun}: #{Exception.message(e)}", __STACKTRACE__
    end
  end
end
