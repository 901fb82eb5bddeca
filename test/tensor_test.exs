defmodule Mambex.TensorTest do
  @moduledoc """
  Transfer and creation on every device: from_binary/to_binary round trips
  for every type over ranks 0 to 8 and zero-sized shapes, fill/zeros/ones/
  iota and cast against bytes written by hand in Nx's format.
  """
  use ExUnit.Case, async: true

  import Mambex.TestHelpers
  alias Mambex.Tensor

  setup context, do: seed_rand(context)

  @shapes [
    {},
    {1},
    {7},
    {3, 5},
    {2, 3, 1, 5},
    {1, 1, 1, 1, 1, 1, 1, 3},
    {2, 2, 2, 2, 2, 2, 2, 2},
    {0},
    {3, 0},
    {2, 0, 3}
  ]

  # Hand-picked values exactly representable in f16, or whose rounding to f16
  # and bf16 is the same whether it goes through f32 or not.
  @float_values [1.5, -0.1, 3.14159, 1 / 3, 1000.25, -65504.0, 6.0e-5, 0.0, -0.0]

  test "types/0 lists the seven Nx type tuples" do
    assert Tensor.types() ==
             [{:f, 32}, {:f, 64}, {:bf, 16}, {:f, 16}, {:s, 32}, {:s, 64}, {:u, 8}]
  end

  test "the hand-written encoders agree with known bit patterns" do
    # guards the references themselves
    assert encode([1.0], {:bf, 16}) == <<0x3F80::16-native>>
    assert encode([1.0 + 1 / 256], {:bf, 16}) == <<0x3F80::16-native>>
    assert encode([1.0 + 3 / 256], {:bf, 16}) == <<0x3F82::16-native>>
    assert encode([-2.0], {:bf, 16}) == <<0xC000::16-native>>
    assert encode([1 / 3], {:f, 16}) == <<0x3555::16-native>>
    assert encode([1.5], {:f, 32}) == <<0x3FC00000::32-native>>
    assert encode([-1], {:s, 32}) == <<0xFFFFFFFF::32>>
    assert decode(encode([255, 7], {:u, 8}), {:u, 8}) == [255, 7]
  end

  for {label, device, tags} <- device_matrix() do
    describe "on #{label}" do
      @describetag tags
      @describetag device: device

      for type <- all_types() do
        @tag type: type
        test "from_binary/to_binary round trip of #{inspect(type)} over ranks 0..8",
             %{device: device, type: type} do
          {_, bits} = type

          for shape <- @shapes do
            n = numel(shape)
            # arbitrary bytes (NaN patterns included) must come back untouched
            bytes = :rand.bytes(div(n * bits, 8))
            t = Tensor.from_binary(bytes, type, shape: shape, device: device)
            assert %Tensor{shape: ^shape, type: ^type, device: ^device} = t
            assert Tensor.to_binary(t) == bytes, "#{inspect(shape)}"
            assert Tensor.rank(t) == tuple_size(shape)
            assert Tensor.size(t) == n
            assert Tensor.byte_size_of(t) == byte_size(bytes)

            # values written as Nx writes them decode to the same values
            values = rand_values(n, type)
            t2 = make(values, type, shape, device)
            assert Tensor.to_binary(t2) == encode(values, type)
            assert read(t2) == values
            assert Tensor.to_flat_list(t2) == values
          end
        end
      end

      test "from_binary defaults to a vector of every element", %{device: device} do
        for type <- all_types() do
          values = rand_values(11, type)
          t = Tensor.from_binary(encode(values, type), type, device: device)
          assert t.shape == {11}
          assert read(t) == values
        end

        assert Tensor.from_binary(<<>>, {:f, 32}, device: device).shape == {0}
      end

      test "to_binary/2 returns the first count elements", %{device: device} do
        for type <- all_types() do
          values = rand_values(15, type)
          t = make(values, type, {3, 5}, device)
          assert Tensor.to_binary(t, 0) == <<>>
          assert Tensor.to_binary(t, 4) == encode(Enum.take(values, 4), type)
          assert Tensor.to_binary(t, 15) == encode(values, type)
          assert Tensor.to_binary(t, 1000) == encode(values, type)
        end
      end

      test "the NIF's byte limit is rounded down to whole elements", %{device: device} do
        values = rand_values(6, {:f, 64})
        t = make(values, {:f, 64}, {6}, device)
        assert Mambex.NIF.to_binary(t, 0) == <<>>
        assert Mambex.NIF.to_binary(t, 7) == <<>>
        assert Mambex.NIF.to_binary(t, 17) == encode(Enum.take(values, 2), {:f, 64})
        assert Mambex.NIF.to_binary(t, 2 ** 64 - 1) == encode(values, {:f, 64})
      end

      test "from_binary copies from sub-binaries at any offset", %{device: device} do
        big = :rand.bytes(4 * 1000 + 7)

        for offset <- [1, 2, 3, 5] do
          part = binary_part(big, offset, 4 * 1000)
          t = Tensor.from_binary(part, {:f, 32}, shape: {10, 100}, device: device)
          assert Tensor.to_binary(t) == part
        end
      end

      test "to_flat_list decodes non-finite floats to atoms", %{device: device} do
        bin =
          <<0x7FC00000::32-native, 0x7F800000::32-native, 0xFF800000::32-native,
            1.0::float-32-native>>

        t = Tensor.from_binary(bin, {:f, 32}, device: device)
        assert Tensor.to_flat_list(t) == [:nan, :infinity, :neg_infinity, 1.0]

        bf = <<0x7FC0::16-native, 0x7F80::16-native, 0xFF80::16-native, 0x3F80::16-native>>

        assert Tensor.to_flat_list(Tensor.from_binary(bf, {:bf, 16}, device: device)) ==
                 [:nan, :infinity, :neg_infinity, 1.0]

        h = <<0x7E00::16-native, 0x7C00::16-native, 0xFC00::16-native, 0x3C00::16-native>>

        assert Tensor.to_flat_list(Tensor.from_binary(h, {:f, 16}, device: device)) ==
                 [:nan, :infinity, :neg_infinity, 1.0]
      end

      test "fill/zeros/ones write exactly the bytes built by hand", %{device: device} do
        for type <- all_types(), shape <- @shapes do
          n = numel(shape)

          values =
            case type do
              {:u, 8} -> [0, 1, 7, 200, 255]
              {:s, 32} -> [0, 1, -5, 2_147_483_647, -2_147_483_648]
              {:s, 64} -> [0, 1, -5, 2 ** 40 + 3, -(2 ** 52) - 1]
              _ -> @float_values
            end

          for v <- values do
            t = Tensor.fill(shape, v, type: type, device: device)
            assert %Tensor{shape: ^shape, type: ^type, device: ^device} = t

            assert Tensor.to_binary(t) == encode(List.duplicate(v, n), type),
                   "fill #{inspect(shape)} #{inspect(type)} with #{v}"
          end

          assert Tensor.to_binary(Tensor.zeros(shape, type: type, device: device)) ==
                   encode(List.duplicate(0, n), type)

          assert Tensor.to_binary(Tensor.ones(shape, type: type, device: device)) ==
                   encode(List.duplicate(1, n), type)
        end
      end

      test "fill defaults to f32 and takes integer values for float types", %{device: device} do
        t = Tensor.fill({2, 3}, 2, device: device)
        assert t.type == {:f, 32}
        assert Tensor.to_binary(t) == encode(List.duplicate(2.0, 6), {:f, 32})
        assert Tensor.to_binary(Tensor.zeros({4})) == <<0::128>>
      end

      test "fill of an s64 tensor is exact beyond 2^53", %{device: device} do
        v = 2 ** 53 + 1
        t = Tensor.fill({3}, v, type: {:s, 64}, device: device)
        assert read(t) == [v, v, v]
      end

      test "iota counts in row-major order and along every axis", %{device: device} do
        for type <- all_types(),
            shape <- [{}, {1}, {7}, {3, 5}, {2, 3, 4}, {2, 1, 3, 1, 2}, {3, 0}] do
          n = numel(shape)
          t = Tensor.iota(shape, type: type, device: device)
          assert %Tensor{shape: ^shape, type: ^type} = t
          assert Tensor.to_binary(t) == encode(Enum.to_list(0..(n - 1)//1), type)

          rank = tuple_size(shape)

          for axis <- Enum.to_list(0..(rank - 1)//1) ++ Enum.to_list(-rank..-1//1) do
            a = if axis < 0, do: axis + rank, else: axis

            expected = for i <- 0..(n - 1)//1, do: Enum.at(unravel(i, shape), a)

            t = Tensor.iota(shape, type: type, device: device, axis: axis)

            assert Tensor.to_binary(t) == encode(expected, type),
                   "iota #{inspect(shape)} #{inspect(type)} axis #{axis}"
          end
        end
      end

      test "iota rounds (bf16, f16) and wraps (u8) like a cast of the count", %{device: device} do
        for type <- [{:bf, 16}, {:f, 16}, {:u, 8}] do
          t = Tensor.iota({300}, type: type, device: device)

          expected =
            encode(Enum.map(0..299, &if(type == {:u, 8}, do: wrap(&1, type), else: &1)), type)

          assert Tensor.to_binary(t) == expected
        end
      end

      test "cast between every pair of types gives the hand-computed bytes", %{device: device} do
        sources = %{
          float: [1.75, -2.5, 100.0, 0.5, 3.140625, -1000.125, 0.1, 65.0],
          signed: [1, -2, 100, 7, 0, 127, -128, 1000],
          unsigned: [0, 1, 7, 100, 127, 200, 255, 64]
        }

        for src <- all_types(), dst <- all_types() do
          values =
            case src do
              {:u, 8} -> sources.unsigned
              {:s, _} -> sources.signed
              _ -> quantize_all(sources.float, src)
            end

          expected =
            values
            |> Enum.map(fn x ->
              if float?(dst), do: x, else: wrap(trunc(x), dst)
            end)
            |> encode(dst)

          t = make(values, src, {2, 4}, device)
          out = Mambex.Ops.cast(t, dst)
          assert %Tensor{shape: {2, 4}, type: ^dst, device: ^device} = out
          assert Tensor.to_binary(out) == expected, "cast #{inspect(src)} -> #{inspect(dst)}"
        end
      end

      test "cast of random f32 data rounds once, to nearest even", %{device: device} do
        values = rand_values(500, {:f, 32}, lo: 1.0e-3, hi: 6.0e4)
        t = make(values, {:f, 32}, {500}, device)

        for dst <- float_types() do
          assert Tensor.to_binary(Mambex.Ops.cast(t, dst)) == encode(values, dst), inspect(dst)
        end

        wide = rand_values(300, {:f, 64})

        assert Tensor.to_binary(Mambex.Ops.cast(make(wide, {:f, 64}, {300}, device), {:f, 32})) ==
                 encode(wide, {:f, 32})
      end

      test "cast of f64 to f16 rounds once, as Nx does", %{device: device} do
        # 1 + 2^-11 + 2^-40 lies just above the f16 tie 1 + 2^-11; through f32
        # it lands exactly on the tie and rounds down to even.
        x = 1 + :math.pow(2, -11) + :math.pow(2, -40)
        t = make([x], {:f, 64}, {1}, device)
        assert Tensor.to_binary(Mambex.Ops.cast(t, {:f, 16})) == <<x::float-16-native>>

        assert Tensor.to_binary(Tensor.fill({1}, x, type: {:f, 16}, device: device)) ==
                 <<x::float-16-native>>
      end

      test "cast of float to integer truncates toward zero and maps NaN to 0", %{device: device} do
        bin = <<0x7FC00000::32-native>> <> encode([2.9, -2.9, 0.99, -0.99], {:f, 32})
        t = Tensor.from_binary(bin, {:f, 32}, device: device)

        for dst <- int_types() do
          assert read(Mambex.Ops.cast(t, dst)) == Enum.map([0, 2, -2, 0, 0], &wrap(&1, dst))
        end
      end

      test "cast of zero-sized and rank-0 tensors", %{device: device} do
        for src <- all_types(), dst <- all_types() do
          assert Mambex.Ops.cast(Tensor.zeros({3, 0}, type: src, device: device), dst).shape ==
                   {3, 0}

          assert read(Mambex.Ops.cast(Tensor.ones({}, type: src, device: device), dst)) ==
                   quantize_all([1], dst)
        end
      end

      test "to_device to the tensor's own device returns it unchanged", %{device: device} do
        t = Tensor.iota({2, 3}, device: device)
        assert Tensor.to_device(t, device) == t
      end

      test "to_device round trip between :cpu and the device keeps every byte", %{device: device} do
        for type <- all_types(), shape <- [{}, {7}, {2, 3, 1, 5}, {0}] do
          bytes = :rand.bytes(div(numel(shape) * elem(type, 1), 8))
          t = Tensor.from_binary(bytes, type, shape: shape)
          d = Tensor.to_device(t, device)
          assert %Tensor{device: ^device, shape: ^shape, type: ^type} = d
          back = Tensor.to_device(d, :cpu)
          assert back.device == :cpu
          assert Tensor.to_binary(d) == bytes
          assert Tensor.to_binary(back) == bytes
        end
      end

      test "free/1 is idempotent and live?/1 follows it", %{device: device} do
        t = Tensor.iota({4}, device: device)
        assert Tensor.live?(t)
        assert Tensor.free(t) == :ok
        refute Tensor.live?(t)
        assert Tensor.free(t) == :ok
        refute Tensor.live?(t)
        # metadata stays readable on the struct
        assert Tensor.shape(t) == {4}
        assert_raise ArgumentError, ~r/freed/, fn -> Tensor.to_binary(t) end
      end

      test "large tensors (dirty scheduler path) round trip", %{device: device} do
        bytes = :rand.bytes(4 * 300 * 301)
        t = Tensor.from_binary(bytes, {:f, 32}, shape: {300, 301}, device: device)
        assert Tensor.to_binary(t) == bytes
        assert Tensor.to_binary(Tensor.reshape(t, {301, 300})) == bytes
      end
    end
  end
end
