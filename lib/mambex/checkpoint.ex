defmodule Mambex.Checkpoint do
  @moduledoc """
  A binary file of named tensors and named numbers (model parameters,
  optimizer state, configuration).

  ## Format (version 1, all integers little-endian)

      magic      8 bytes  "MAMBEXCK"
      version    u32      1
      n_numbers  u32
      n_numbers × number:
        name_len u16, name (UTF-8, 1..1024 bytes)
        kind     u8       0 = integer (s64), 1 = float (f64)
        value    8 bytes
      n_tensors  u32
      n_tensors × tensor:
        name_len u16, name (UTF-8, 1..1024 bytes)
        type     u8       0 f32, 1 f64, 2 bf16, 3 f16, 4 s32, 5 s64, 6 u8
        rank     u8       0..8
        dims     rank × u64
        nbytes   u64      = product(dims) × type size
        data     nbytes   row-major, little-endian (the native order of every
                          supported target: tensor bytes are written as they are)
      crc32      u32      of every byte before it

  Names are strings (never atoms). `read/2` checks every field (magic,
  version, lengths, ranks, sizes against the file, duplicate names, the
  checksum) before creating any tensor, and returns `{:error, reason}` for a
  truncated or corrupt file; it never raises on file contents.
  """

  alias Mambex.Tensor

  @magic "MAMBEXCK"
  @version 1
  @max_name 1024
  @types [{:f, 32}, {:f, 64}, {:bf, 16}, {:f, 16}, {:s, 32}, {:s, 64}, {:u, 8}]

  @type numbers :: %{String.t() => number()}
  @type tensors :: %{String.t() => Tensor.t()}

  @doc """
  Writes `tensors` and `numbers` to `path` (through a temporary file renamed
  into place). Reading the tensors waits for their device.
  """
  @spec write(Path.t(), tensors(), numbers()) :: :ok | {:error, term()}
  def write(path, tensors, numbers \\ %{}) do
    iodata = encode(tensors, numbers)
    tmp = path <> ".tmp"

    with :ok <- File.write(tmp, iodata) do
      File.rename(tmp, path)
    end
  end

  @doc "The file's bytes for `tensors` and `numbers` (see the format above)."
  @spec encode(tensors(), numbers()) :: binary()
  def encode(tensors, numbers) do
    nums =
      for {name, v} <- Enum.sort(numbers) do
        check_name!(name)

        value =
          cond do
            is_integer(v) -> <<0, v::signed-little-64>>
            is_float(v) -> <<1, v::float-little-64>>
            true -> raise ArgumentError, "Checkpoint: number #{inspect(name)} must be a number, got: #{inspect(v)}"
          end

        [<<byte_size(name)::little-16>>, name, value]
      end

    tens =
      for {name, t} <- Enum.sort(tensors) do
        check_name!(name)
        %Tensor{shape: shape, type: type} = t
        code = Enum.find_index(@types, &(&1 == type))
        dims = Tuple.to_list(shape)
        data = Tensor.to_binary(t)

        [
          <<byte_size(name)::little-16>>,
          name,
          <<code, length(dims)>>,
          for(d <- dims, do: <<d::little-64>>),
          <<byte_size(data)::little-64>>,
          data
        ]
      end

    body =
      IO.iodata_to_binary([
        @magic,
        <<@version::little-32, length(nums)::little-32>>,
        nums,
        <<length(tens)::little-32>>,
        tens
      ])

    body <> <<:erlang.crc32(body)::little-32>>
  end

  defp check_name!(name) do
    unless is_binary(name) and byte_size(name) in 1..@max_name and String.valid?(name),
      do: raise(ArgumentError, "Checkpoint: names must be UTF-8 strings of 1..#{@max_name} bytes, got: #{inspect(name)}")
  end

  @doc """
  Reads a file written by `write/3`; tensors are created on `device`.
  Returns `{:ok, tensors, numbers}` or `{:error, reason}` (a string).
  """
  @spec read(Path.t(), Tensor.device()) :: {:ok, tensors(), numbers()} | {:error, String.t()}
  def read(path, device \\ :cpu) do
    case File.read(path) do
      {:ok, bin} -> decode(bin, device)
      {:error, reason} -> {:error, "cannot read #{path}: #{:file.format_error(reason)}"}
    end
  end

  @doc "Decodes the bytes of a checkpoint (see `read/2`)."
  @spec decode(binary(), Tensor.device()) :: {:ok, tensors(), numbers()} | {:error, String.t()}
  def decode(bin, device \\ :cpu) when is_binary(bin) do
    with {:ok, body} <- check_crc(bin),
         {:ok, rest} <- header(body),
         {:ok, numbers, rest} <- numbers(rest),
         {:ok, entries} <- tensor_entries(rest) do
      tensors =
        Map.new(entries, fn {name, type, shape, data} ->
          {name, Tensor.from_binary(data, type, shape: shape, device: device)}
        end)

      {:ok, tensors, numbers}
    end
  end

  defp check_crc(bin) when byte_size(bin) < byte_size(@magic) + 16,
    do: {:error, "truncated: #{byte_size(bin)} bytes"}

  defp check_crc(bin) do
    size = byte_size(bin) - 4
    <<body::binary-size(size), crc::little-32>> = bin

    if :erlang.crc32(body) == crc,
      do: {:ok, body},
      else: {:error, "checksum mismatch (truncated or corrupt file)"}
  end

  defp header(<<@magic, @version::little-32, rest::binary>>), do: {:ok, rest}
  defp header(<<@magic, v::little-32, _::binary>>), do: {:error, "unsupported version #{v}"}
  defp header(_), do: {:error, "not a Mambex checkpoint (bad magic)"}

  defp numbers(<<n::little-32, rest::binary>>), do: numbers(n, rest, %{})
  defp numbers(_), do: {:error, "truncated in the number count"}

  defp numbers(0, rest, acc), do: {:ok, acc, rest}

  defp numbers(k, <<len::little-16, rest::binary>>, acc) when len in 1..@max_name do
    case rest do
      <<name::binary-size(len), kind, value::binary-8, rest::binary>> ->
        with :ok <- valid_name(name, acc),
             {:ok, v} <- number_value(kind, value) do
          numbers(k - 1, rest, Map.put(acc, name, v))
        end

      _ ->
        {:error, "truncated in a number"}
    end
  end

  defp numbers(_, _, _), do: {:error, "bad or truncated number entry"}

  defp number_value(0, <<v::signed-little-64>>), do: {:ok, v}
  defp number_value(1, <<v::float-little-64>>), do: {:ok, v}
  defp number_value(1, _), do: {:error, "a float number is not finite"}
  defp number_value(kind, _), do: {:error, "unknown number kind #{kind}"}

  defp valid_name(name, acc) do
    cond do
      not String.valid?(name) -> {:error, "a name is not valid UTF-8"}
      Map.has_key?(acc, name) -> {:error, "duplicate name #{inspect(name)}"}
      true -> :ok
    end
  end

  defp tensor_entries(<<n::little-32, rest::binary>>), do: tensor_entries(n, rest, %{}, [])
  defp tensor_entries(_), do: {:error, "truncated in the tensor count"}

  defp tensor_entries(0, <<>>, _seen, acc), do: {:ok, Enum.reverse(acc)}
  defp tensor_entries(0, _rest, _seen, _acc), do: {:error, "trailing bytes after the last tensor"}

  defp tensor_entries(k, <<len::little-16, rest::binary>>, seen, acc) when len in 1..@max_name do
    with <<name::binary-size(len), code, rank, rest::binary>> <- rest,
         :ok <- valid_name(name, seen),
         {:ok, type} <- type_of(code),
         true <- rank <= 8 || {:error, "rank #{rank} of #{inspect(name)} is over 8"},
         <<dims_bin::binary-size(rank * 8), nbytes::little-64, rest::binary>> <- rest,
         dims = for(<<d::little-64 <- dims_bin>>, do: d),
         :ok <- check_size(name, dims, type, nbytes, byte_size(rest)),
         <<data::binary-size(nbytes), rest::binary>> <- rest do
      entry = {name, type, List.to_tuple(dims), data}
      tensor_entries(k - 1, rest, Map.put(seen, name, true), [entry | acc])
    else
      {:error, _} = e -> e
      _ -> {:error, "truncated in a tensor entry"}
    end
  end

  defp tensor_entries(_, _, _, _), do: {:error, "bad or truncated tensor entry"}

  defp type_of(code) when code in 0..6, do: {:ok, Enum.at(@types, code)}
  defp type_of(code), do: {:error, "unknown type code #{code}"}

  defp check_size(name, dims, {_, bits}, nbytes, available) do
    numel = Enum.reduce(dims, 1, &*/2)

    cond do
      numel * div(bits, 8) != nbytes ->
        {:error, "#{inspect(name)}: #{nbytes} bytes do not match its shape"}

      nbytes > available ->
        {:error, "truncated in the data of #{inspect(name)}"}

      true ->
        :ok
    end
  end
end
