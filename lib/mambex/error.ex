defmodule Mambex.Error do
  @moduledoc """
  A runtime failure of a Mambex operation: a CUDA error, running out of
  memory, or a device lost to an earlier sticky error.

  Misuse (wrong argument types, shapes, dtypes or devices, freed tensors)
  raises `ArgumentError` instead.

    * `:kind` is `:out_of_memory`, `:runtime` or `:device_lost`
    * `:op` names the operation that failed
    * `:message` carries the op and the backend's message (for CUDA errors,
      the CUDA error string and the call site)
  """
  defexception [:message, :kind, :op]

  @type t :: %__MODULE__{
          message: String.t(),
          kind: :out_of_memory | :runtime | :device_lost,
          op: String.t()
        }
end
