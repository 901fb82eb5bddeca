defmodule Mambex.Tensor do
  @moduledoc """
  A tensor held by the native library, on the CPU or on a CUDA device.

  The struct only describes the tensor; its bytes live in native memory owned
  by `:ref`, a BEAM resource. The memory is released when the last reference
  to `:ref` is garbage collected, or earlier by `free/1`. Using a tensor after
  `free/1` raises `ArgumentError`.

  ## Types and layout

  Types are Nx's type tuples: `{:f, 32}`, `{:f, 64}`, `{:bf, 16}`, `{:f, 16}`,
  `{:s, 32}`, `{:s, 64}` and `{:u, 8}`. Binaries are row-major, contiguous
  and native-endian, exactly as `Nx.to_binary/1` writes them, so Nx data goes
  in and out without conversion:

      t = Mambex.Tensor.from_binary(Nx.to_binary(x), {:f, 32}, shape: {2, 3})
      Nx.from_binary(Mambex.Tensor.to_binary(t), {:f, 32}) |> Nx.reshape({2, 3})

  ## Devices

  `:cpu` or `{:cuda, index}`. Operations on a CUDA device are enqueued on the
  device's stream and return at once; `to_binary/1` and `Mambex.sync/1` wait.
  """

  alias Mambex.NIF

  @enforce_keys [:ref, :shape, :type, :device]
  defstruct [:ref, :shape, :type, :device]

  @type type ::
          {:f, 32} | {:f, 64} | {:bf, 16} | {:f, 16} | {:s, 32} | {:s, 64} | {:u, 8}
  @type shape :: tuple()
  @type device :: :cpu | {:cuda, non_neg_integer()}
  @type t :: %__MODULE__{ref: reference(), shape: shape(), type: type(), device: device()}

  @types [{:f, 32}, {:f, 64}, {:bf, 16}, {:f, 16}, {:s, 32}, {:s, 64}, {:u, 8}]

  @doc "The supported type tuples."
  @spec types() :: [type()]
  def types, do: @types

  # ---- transfer -----------------------------------------------------------

  @doc """
  Creates a tensor from a binary in Nx's format (row-major, native-endian).

  Options: `:shape` (default: a vector of all the elements) and `:device`
  (default `:cpu`). Raises `ArgumentError` when the binary's size does not
  match the shape and type.
  """
  @spec from_binary(binary(), type(), keyword()) :: t()
  def from_binary(data, type, opts \\ []) do
    opts = check_opts!(opts, [:shape, :device], "from_binary")
    shape = Keyword.get_lazy(opts, :shape, fn -> vector_shape(data, type) end)
    device = Keyword.get(opts, :device, :cpu)
    Mambex.retry_oom(fn -> NIF.from_binary(data, type, shape, device) end)
  end

  defp vector_shape(data, type) when is_binary(data) do
    case type do
      {_, bits} when is_integer(bits) and bits > 0 -> {div(byte_size(data) * 8, bits)}
      _ -> {0}
    end
  end

  defp vector_shape(_data, _type), do: {0}

  @doc "The tensor's bytes (waits for pending device work)."
  @spec to_binary(t()) :: binary()
  def to_binary(%__MODULE__{} = t), do: NIF.to_binary(t, byte_size_of(t))
  def to_binary(other), do: NIF.to_binary(other, 0)

  @doc "The first `count` elements as a binary (all when the tensor is smaller)."
  @spec to_binary(t(), non_neg_integer()) :: binary()
  def to_binary(%__MODULE__{type: {_, bits}} = t, count) when is_integer(count) and count >= 0,
    do: NIF.to_binary(t, min(div(count * bits, 8), byte_size_of(t)))

  def to_binary(t, count),
    do: raise(ArgumentError, "to_binary: expected a Mambex.Tensor and a non-negative count, got: #{inspect(t)}, #{inspect(count)}")

  @doc "The elements as a flat list of numbers (`:nan`, `:infinity` and `:neg_infinity` for non-finite floats)."
  @spec to_flat_list(t()) :: [number() | atom()]
  def to_flat_list(%__MODULE__{type: type} = t), do: decode(to_binary(t), type)
  def to_flat_list(other), do: not_a_tensor!("to_flat_list", other)

  @doc false
  def decode(bin, {:f, 32}), do: for(<<x::binary-4 <- bin>>, do: float_or_special(x, 32))
  def decode(bin, {:f, 64}), do: for(<<x::binary-8 <- bin>>, do: float_or_special(x, 64))
  def decode(bin, {:f, 16}), do: for(<<x::binary-2 <- bin>>, do: float_or_special(x, 16))

  def decode(bin, {:bf, 16}) do
    for <<h::16-native <- bin>>, do: float_or_special(<<h * 65_536::32-native>>, 32)
  end

  def decode(bin, {:s, 32}), do: for(<<x::signed-32-native <- bin>>, do: x)
  def decode(bin, {:s, 64}), do: for(<<x::signed-64-native <- bin>>, do: x)
  def decode(bin, {:u, 8}), do: for(<<x::unsigned-8 <- bin>>, do: x)

  defp float_or_special(bytes, bits) do
    case bytes do
      <<x::float-size(bits)-native>> ->
        x

      _ ->
        <<u::size(bits)-native>> = bytes
        man_bits = %{16 => 10, 32 => 23, 64 => 52}[bits]

        cond do
          rem(u, Integer.pow(2, man_bits)) != 0 -> :nan
          u >= Integer.pow(2, bits - 1) -> :neg_infinity
          true -> :infinity
        end
    end
  end

  @doc "Copies the tensor to `device` (returns it unchanged when already there)."
  @spec to_device(t(), device()) :: t()
  def to_device(t, device), do: Mambex.retry_oom(fn -> NIF.to_device(t, device) end)

  @doc """
  Releases the tensor's memory now instead of at garbage collection.
  Idempotent. Views sharing the memory (see `reshape/2`) keep it alive.
  """
  @spec free(t()) :: :ok
  def free(t), do: NIF.free(t)

  @doc "Whether the tensor has not been freed."
  @spec live?(t()) :: boolean()
  def live?(t), do: NIF.live?(t)

  # ---- metadata -----------------------------------------------------------

  @doc "The shape tuple."
  @spec shape(t()) :: shape()
  def shape(%__MODULE__{shape: s}), do: s
  def shape(other), do: not_a_tensor!("shape", other)

  @doc "The type tuple."
  @spec type(t()) :: type()
  def type(%__MODULE__{type: ty}), do: ty
  def type(other), do: not_a_tensor!("type", other)

  @doc "The device."
  @spec device(t()) :: device()
  def device(%__MODULE__{device: d}), do: d
  def device(other), do: not_a_tensor!("device", other)

  @doc "The number of axes."
  @spec rank(t()) :: non_neg_integer()
  def rank(%__MODULE__{shape: s}), do: tuple_size(s)
  def rank(other), do: not_a_tensor!("rank", other)

  @doc "The number of elements."
  @spec size(t()) :: non_neg_integer()
  def size(%__MODULE__{shape: s}), do: s |> Tuple.to_list() |> Enum.reduce(1, &*/2)
  def size(other), do: not_a_tensor!("size", other)

  @doc "The number of bytes of the elements."
  @spec byte_size_of(t()) :: non_neg_integer()
  def byte_size_of(%__MODULE__{type: {_, bits}} = t), do: div(size(t) * bits, 8)
  def byte_size_of(other), do: not_a_tensor!("byte_size_of", other)

  defp not_a_tensor!(op, other),
    do: raise(ArgumentError, "#{op}: expected a Mambex.Tensor, got: #{inspect(other)}")

  # Options must be a keyword list of known keys.
  defp check_opts!(opts, known, op) do
    unless is_list(opts) and Enum.all?(opts, &match?({k, _} when is_atom(k), &1)) do
      raise ArgumentError, "#{op}: options must be a keyword list, got: #{inspect(opts)}"
    end

    case Keyword.keys(opts) -- known do
      [] -> opts
      unknown -> raise ArgumentError, "#{op}: unknown options #{inspect(unknown)} (known: #{inspect(known)})"
    end
  end

  defp fetch_seed!(opts, op) do
    case Keyword.fetch(opts, :seed) do
      {:ok, seed} -> seed
      :error -> raise ArgumentError, "#{op}: the :seed option is required (a non-negative integer)"
    end
  end

  # ---- creation -----------------------------------------------------------

  @doc """
  A tensor of `shape` filled with `value`.

  Options: `:type` (default `{:f, 32}`), `:device` (default `:cpu`).
  """
  @spec fill(shape(), number(), keyword()) :: t()
  def fill(shape, value, opts \\ []) do
    {type, device} = type_device(opts)
    Mambex.retry_oom(fn -> NIF.fill(shape, type, device, value) end)
  end

  @doc "Zeros; options as `fill/3`."
  @spec zeros(shape(), keyword()) :: t()
  def zeros(shape, opts \\ []), do: fill(shape, 0, opts)

  @doc "Ones; options as `fill/3`."
  @spec ones(shape(), keyword()) :: t()
  def ones(shape, opts \\ []), do: fill(shape, 1, opts)

  @doc """
  Counts along `:axis` (0, 1, 2… repeated), or over all elements in row-major
  order when `:axis` is not given. Options as `fill/3` plus `:axis`.
  """
  @spec iota(shape(), keyword()) :: t()
  def iota(shape, opts \\ []) do
    {type, device} = type_device(opts)
    Mambex.retry_oom(fn -> NIF.iota(shape, type, device, Keyword.get(opts, :axis)) end)
  end

  @doc """
  Uniform samples in `[min, max)` (options `:min` 0.0, `:max` 1.0).

  `:seed` (a non-negative integer) is required: element `i` depends only on
  the seed and `i`, so the same seed gives the same values on the same device
  (and, up to the last bit of the math library, on every device).
  Options as `fill/3` too.
  """
  @spec random_uniform(shape(), keyword()) :: t()
  def random_uniform(shape, opts) do
    opts = check_opts!(opts, [:type, :device, :seed, :min, :max], "random_uniform")
    {type, device} = type_device(opts)
    seed = fetch_seed!(opts, "random_uniform")
    min = Keyword.get(opts, :min, 0.0)
    max = Keyword.get(opts, :max, 1.0)
    Mambex.retry_oom(fn -> NIF.random(shape, type, device, seed, :uniform, min, max) end)
  end

  @doc """
  Normal samples with `:mean` (0.0) and `:std` (1.0); `:seed` as in
  `random_uniform/2`. Float types only.
  """
  @spec random_normal(shape(), keyword()) :: t()
  def random_normal(shape, opts) do
    opts = check_opts!(opts, [:type, :device, :seed, :mean, :std], "random_normal")
    {type, device} = type_device(opts)
    seed = fetch_seed!(opts, "random_normal")
    mean = Keyword.get(opts, :mean, 0.0)
    std = Keyword.get(opts, :std, 1.0)
    Mambex.retry_oom(fn -> NIF.random(shape, type, device, seed, :normal, mean, std) end)
  end

  defp type_device(opts) when is_list(opts),
    do: {Keyword.get(opts, :type, {:f, 32}), Keyword.get(opts, :device, :cpu)}

  defp type_device(opts), do: raise(ArgumentError, "options must be a keyword list, got: #{inspect(opts)}")

  # ---- views and copies ---------------------------------------------------

  @doc "A view with a new shape of the same number of elements (no copy)."
  @spec reshape(t(), shape()) :: t()
  def reshape(t, shape), do: NIF.reshape(t, shape)

  @doc """
  A copy of `length` entries from `start` along `axis` (negative axes count
  from the end).
  """
  @spec slice(t(), integer(), non_neg_integer(), non_neg_integer()) :: t()
  def slice(t, axis, start, length),
    do: Mambex.retry_oom(fn -> NIF.slice(t, axis, start, length) end)

  @doc "Joins tensors of one type and device along `axis` (a copy)."
  @spec concatenate([t()], integer()) :: t()
  def concatenate(tensors, axis \\ 0),
    do: Mambex.retry_oom(fn -> NIF.concatenate(tensors, axis) end)

  @doc """
  A copy with axes permuted: the result's axis `k` is the input's axis
  `axes[k]`. The default reverses the axes.
  """
  @spec transpose(t(), tuple() | nil) :: t()
  def transpose(t, axes \\ nil)

  def transpose(%__MODULE__{shape: s} = t, nil),
    do: transpose(t, (tuple_size(s) - 1)..0//-1 |> Enum.to_list() |> List.to_tuple())

  def transpose(t, axes) when is_list(axes), do: transpose(t, List.to_tuple(axes))
  def transpose(t, axes), do: Mambex.retry_oom(fn -> NIF.permute(t, axes) end)
end

defimpl Inspect, for: Mambex.Tensor do
  import Inspect.Algebra

  @shown 16

  def inspect(%Mambex.Tensor{shape: shape, type: {k, bits} = type, device: device} = t, opts)
      when is_tuple(shape) and is_atom(k) and is_integer(bits) do
    dims = shape |> Tuple.to_list() |> Enum.map_join(&"[#{&1}]")
    dev = if device == :cpu, do: "cpu", else: "cuda:#{elem(device, 1)}"

    values =
      if live?(t) do
        bin = Mambex.NIF.to_binary(t, div(@shown * bits, 8))
        list = Mambex.Tensor.decode(bin, type)
        more = if Mambex.Tensor.size(t) > @shown, do: ", ...", else: ""
        "[" <> Enum.map_join(list, ", ", &fmt/1) <> more <> "]"
      else
        "freed"
      end

    concat(["#Mambex.Tensor<", "#{k}#{bits}#{dims} #{dev} ", color(values, :list, opts), ">"])
  end

  def inspect(other, opts), do: Inspect.Any.inspect(other, opts)

  defp live?(t) do
    Mambex.NIF.live?(t)
  rescue
    ArgumentError -> false
  end

  defp fmt(x) when is_float(x), do: :erlang.float_to_binary(x, [:short])
  defp fmt(x), do: to_string(x)
end
