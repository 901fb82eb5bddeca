defmodule Mambex do
  @moduledoc """
  Fast sequence-model kernels for Elixir, with tensors that stay on the
  device.

  Tensors (`Mambex.Tensor`) live in native memory on the CPU or on a CUDA
  GPU. Operations (`Mambex.Ops`) on a GPU are enqueued on one stream per
  device and return at once, so a chain of ops runs without host round trips;
  only reading a result (`Mambex.Tensor.to_binary/1`) or `sync/1` waits.

  The CUDA backend is a separate native object loaded when present and when a
  device answers; otherwise everything runs on the C CPU backend.
  Set `MAMBEX_CUDA=0` in the environment to force the CPU backend.
  """

  alias Mambex.NIF

  @type device :: Mambex.Tensor.device()

  @doc "Whether at least one CUDA device is usable."
  @spec cuda_available?() :: boolean()
  def cuda_available?, do: cuda_device_count() > 0

  @doc "The number of usable CUDA devices."
  @spec cuda_device_count() :: non_neg_integer()
  def cuda_device_count, do: NIF.backend_info().cuda_devices

  @doc "Why CUDA is or is not available (for diagnostics)."
  @spec cuda_status() :: String.t()
  def cuda_status, do: NIF.backend_info().cuda_status

  @doc "The best available device: `{:cuda, 0}` when a GPU answers, else `:cpu`."
  @spec default_device() :: device()
  def default_device, do: if(cuda_available?(), do: {:cuda, 0}, else: :cpu)

  @doc "Every usable device."
  @spec devices() :: [device()]
  def devices, do: [:cpu | for(i <- 0..(cuda_device_count() - 1)//1, do: {:cuda, i})]

  @doc "The device's name (\"cpu\" or the GPU's product name)."
  @spec device_name(device()) :: String.t()
  def device_name(device), do: NIF.device_name(device)

  @doc "Waits until all work enqueued on a device (or a tensor's device) has finished."
  @spec sync(device() | Mambex.Tensor.t()) :: :ok
  def sync(%Mambex.Tensor{device: device}), do: NIF.sync(device)
  def sync(device), do: NIF.sync(device)

  @doc """
  Memory statistics of a device: `:live_bytes` and `:live_handles` (tensors
  alive now), `:peak_bytes` (since start or `reset_peak/1`) and
  `:total_allocs`.
  """
  @spec memory_stats(device()) :: %{
          live_bytes: non_neg_integer(),
          peak_bytes: non_neg_integer(),
          live_handles: non_neg_integer(),
          total_allocs: non_neg_integer()
        }
  def memory_stats(device), do: NIF.memory_stats(device)

  @doc """
  Chooses where ops on CUDA devices run (for the whole VM):

    * `:dirty` (the default) — every device op moves to a dirty IO
      scheduler, enqueues its work there and returns.
    * `:inline` — ops that only enqueue device work run on the calling
      normal scheduler once the device is set up, saving the hop to a dirty
      scheduler and back (several µs per op; it matters for chains of small
      ops such as one-frame inference). Ops that wait for the device
      (reading or uploading data, `sync/1`, event timing) still move. The
      cost: an enqueue blocks its scheduler when the device's launch queue
      is full (about a thousand kernels queued without a sync), so use it
      for latency-bound loops that read a result every few dozen ops.

  CPU ops are unaffected. Returns `:ok`.
  """
  @spec set_executor(:dirty | :inline) :: :ok
  def set_executor(:dirty), do: NIF.set_executor(false)
  def set_executor(:inline), do: NIF.set_executor(true)

  def set_executor(other),
    do: raise(ArgumentError, "set_executor: the mode must be :dirty or :inline, got: #{inspect(other)}")

  @doc "The executor mode set by `set_executor/1`."
  @spec executor() :: :dirty | :inline
  def executor, do: if(NIF.executor_inline?(), do: :inline, else: :dirty)

  @doc "Resets `:peak_bytes` to the live bytes."
  @spec reset_peak(device()) :: :ok
  def reset_peak(device), do: NIF.reset_peak(device)

  @doc false
  # Runs an allocating call; on out-of-memory, garbage-collects the calling
  # process (releasing its dead tensors) and tries once more.
  def retry_oom(fun) do
    fun.()
  rescue
    e in Mambex.Error ->
      if e.kind == :out_of_memory do
        :erlang.garbage_collect()
        # Resources found dead are released once the process is scheduled
        # out: yield before trying again.
        receive do
        after
          1 -> :ok
        end

        fun.()
      else
        reraise e, __STACKTRACE__
      end
  end
end
