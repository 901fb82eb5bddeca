defmodule Mambex.OpsTest do
  @moduledoc """
  Every elementwise op, axpy, cast and reduction on every device and type,
  against a float64 (floats) or exact-integer (wrapped) reference computed in
  Elixir from random, never-zero inputs.
  """
  use ExUnit.Case, async: true

  import Mambex.TestHelpers
  alias Mambex.{Ops, Tensor}

  setup context, do: seed_rand(context)

  @binary_ops [:add, :subtract, :multiply, :divide, :maximum, :minimum]

  # A scalar operand per type: floats get a fractional one, integers a small
  # one that fits every integer type.
  defp scalar_for(type) do
    if float?(type), do: Enum.random([1.75, -0.625, 3.5]), else: Enum.random([3, 7, 100])
  end

  # Runs `op` on operand specs and compares with the reference. A spec is
  # {:tensor, shape} or {:scalar, value}.
  defp check_binary(op, spec_a, spec_b, type, device) do
    {a, a_vals, a_shape} = operand(spec_a, type, device)
    {b, b_vals, b_shape} = operand(spec_b, type, device)
    out = apply(Ops, op, [a, b])

    big_shape =
      case {a_shape, b_shape} do
        {nil, s} -> s
        {s, nil} -> s
        {sa, sb} -> if tuple_size(sa) >= tuple_size(sb), do: sa, else: sb
      end

    n = numel(big_shape)
    a_t = if is_list(a_vals), do: List.to_tuple(a_vals), else: a_vals
    b_t = if is_list(b_vals), do: List.to_tuple(b_vals), else: b_vals

    ref =
      for i <- 0..(n - 1)//1 do
        x = if is_tuple(a_t), do: elem(a_t, rem(i, tuple_size(a_t))), else: a_t
        y = if is_tuple(b_t), do: elem(b_t, rem(i, tuple_size(b_t))), else: b_t
        ref_binary(op, x, y, type)
      end

    label = "#{op}(#{inspect(spec_a)}, #{inspect(spec_b)})"
    assert %Tensor{shape: ^big_shape, type: ^type, device: ^device} = out
    assert_matches(read(out), ref, type, :elementwise, label)
  end

  defp operand({:tensor, shape}, type, device) do
    {t, vals} = rand_tensor(shape, type, device)
    {t, vals, shape}
  end

  defp operand({:scalar, v}, _type, _device), do: {v, v, nil}

  for {label, device, tags} <- device_matrix() do
    describe "on #{label}" do
      @describetag tags
      @describetag device: device

      for op <- @binary_ops do
        @tag op: op
        test "#{op}: same shape, scalars, trailing broadcast and rank-0 tensors",
             %{device: device, op: op} do
          for type <- all_types() do
            s = scalar_for(type)

            specs = [
              {{:tensor, {3, 5}}, {:tensor, {3, 5}}},
              {{:tensor, {}}, {:tensor, {}}},
              {{:tensor, {2, 3, 5}}, {:scalar, s}},
              {{:scalar, s}, {:tensor, {2, 3, 5}}},
              {{:tensor, {2, 3, 5}}, {:tensor, {5}}},
              {{:tensor, {5}}, {:tensor, {2, 3, 5}}},
              {{:tensor, {2, 7, 3}}, {:tensor, {7, 3}}},
              {{:tensor, {7, 3}}, {:tensor, {2, 7, 3}}},
              {{:tensor, {2, 3, 5}}, {:tensor, {}}},
              {{:tensor, {}}, {:tensor, {2, 3, 5}}},
              {{:tensor, {1}}, {:tensor, {1}}},
              {{:tensor, {0}}, {:tensor, {0}}},
              {{:tensor, {3, 0}}, {:scalar, s}},
              # big enough to move to a dirty scheduler
              {{:tensor, {150, 151}}, {:tensor, {150, 151}}},
              {{:tensor, {150, 151}}, {:tensor, {151}}},
              {{:scalar, s}, {:tensor, {150, 151}}}
            ]

            for {sa, sb} <- specs, do: check_binary(op, sa, sb, type, device)
          end
        end
      end

      test "float ops accept integer scalars", %{device: device} do
        for type <- float_types(), op <- @binary_ops do
          check_binary(op, {:tensor, {2, 5}}, {:scalar, 2}, type, device)
          check_binary(op, {:scalar, -3}, {:tensor, {2, 5}}, type, device)
        end
      end

      test "integer ops wrap around", %{device: device} do
        s32 = make([2_147_483_647, -2_147_483_648, 65_536], {:s, 32}, {3}, device)
        assert read(Ops.add(s32, 1)) == [-2_147_483_648, -2_147_483_647, 65_537]
        assert read(Ops.subtract(s32, 1)) == [2_147_483_646, 2_147_483_647, 65_535]
        assert read(Ops.multiply(s32, s32)) == [1, 0, 0]
        assert read(Ops.negate(s32)) == [-2_147_483_647, -2_147_483_648, -65_536]

        u8 = make([250, 3, 128], {:u, 8}, {3}, device)
        assert read(Ops.add(u8, 10)) == [4, 13, 138]
        assert read(Ops.subtract(u8, 5)) == [245, 254, 123]
        assert read(Ops.subtract(5, u8)) == [11, 2, 133]
        assert read(Ops.multiply(u8, u8)) == [36, 9, 0]
        assert read(Ops.negate(u8)) == [6, 253, 128]

        s64 = make([9_223_372_036_854_775_807, -9_223_372_036_854_775_808], {:s, 64}, {2}, device)
        assert read(Ops.add(s64, s64)) == [-2, 0]
        assert read(Ops.negate(s64)) == [-9_223_372_036_854_775_807, -9_223_372_036_854_775_808]
      end

      test "integer division truncates toward zero and gives 0 for a zero divisor",
           %{device: device} do
        for type <- [{:s, 32}, {:s, 64}] do
          a = make([7, -7, 7, -7, 5, 0, -1], type, {7}, device)
          b = make([2, 2, -2, -2, 0, 3, 0], type, {7}, device)
          assert read(Ops.divide(a, b)) == [3, -3, -3, 3, 0, 0, 0]
          assert read(Ops.divide(a, 0)) == [0, 0, 0, 0, 0, 0, 0]
          assert read(Ops.divide(100, b)) == [50, 50, -50, -50, 0, 33, 0]
          assert read(Ops.divide(a, make([0], type, {}, device))) == List.duplicate(0, 7)
        end

        u8 = make([200, 7, 0, 255], {:u, 8}, {4}, device)
        assert read(Ops.divide(u8, make([3, 0, 5, 2], {:u, 8}, {4}, device))) == [66, 0, 0, 127]
        assert read(Ops.divide(u8, 0)) == [0, 0, 0, 0]
        assert read(Ops.divide(255, u8)) == [1, 36, 0, 1]
      end

      test "dividing the most negative integer by -1 wraps (as in every other op)",
           %{device: device} do
        s32 = make([-2_147_483_648], {:s, 32}, {1}, device)
        assert read(Ops.divide(s32, -1)) == [-2_147_483_648]
        assert read(Ops.divide(s32, make([-1], {:s, 32}, {1}, device))) == [-2_147_483_648]

        min64 = -9_223_372_036_854_775_808
        s64 = make([min64], {:s, 64}, {1}, device)
        assert read(Ops.divide(s64, make([-1], {:s, 64}, {1}, device))) == [min64]
      end

      test "s64 ops with a scalar are exact beyond 2^53", %{device: device} do
        t = make([0, 1, -1], {:s, 64}, {3}, device)
        big = 2 ** 53 + 1
        assert read(Ops.add(t, big)) == [big, big + 1, big - 1]
        assert read(Ops.subtract(big, t)) == [big, big - 1, big + 1]

        assert read(Ops.axpy(big, make([1, 1, 1], {:s, 64}, {3}, device), t)) ==
                 [big, big + 1, big - 1]
      end

      test "float division by zero and NaN propagation", %{device: device} do
        for type <- float_types() do
          t = make([1.0, -1.0, 0.0], type, {3}, device)
          assert read(Ops.divide(t, 0)) == [:infinity, :neg_infinity, :nan]

          nan =
            case type do
              {:f, 32} -> <<0x7FC00000::32-native>>
              {:f, 64} -> <<0x7FF8000000000000::64-native>>
              {:bf, 16} -> <<0x7FC0::16-native>>
              {:f, 16} -> <<0x7E00::16-native>>
            end

          n = Tensor.from_binary(nan <> encode([2.0], type), type, device: device)
          one = make([1.0, 1.0], type, {2}, device)
          assert read(Ops.maximum(n, one)) == [:nan, 2.0]
          assert read(Ops.minimum(one, n)) == [:nan, 1.0]
          assert read(Ops.maximum(n, 5)) == [:nan, 5.0]
          assert read(Ops.add(n, one)) == [:nan, 3.0]
          assert read(Ops.max(n)) == [:nan]
        end
      end

      for op <- [:negate, :exp, :log, :sqrt] do
        @tag op: op
        test "#{op} against the reference", %{device: device, op: op} do
          types = if op == :negate, do: all_types(), else: float_types()

          for type <- types, shape <- [{}, {7}, {3, 5}, {2, 3, 1, 5}, {0}, {150, 151}] do
            opts =
              case op do
                :exp -> [lo: 0.01, hi: 4.0]
                :negate -> []
                _ -> [positive: true, lo: 0.01, hi: 100.0]
              end

            {t, vals} = rand_tensor(shape, type, device, opts)
            out = apply(Ops, op, [t])
            assert %Tensor{shape: ^shape, type: ^type, device: ^device} = out
            ref = Enum.map(vals, &ref_unary(op, &1, type))
            assert_matches(read(out), ref, type, :elementwise, "#{op} #{inspect(shape)}")
          end
        end
      end

      test "axpy against the reference", %{device: device} do
        for type <- all_types(), shape <- [{}, {7}, {2, 3, 5}, {0}, {150, 151}] do
          alpha =
            if float?(type), do: Enum.random([0.75, 1.5, -2.0]), else: Enum.random([3, -2, 5])

          # floats: alpha * x and y share a sign, so no cancellation amplifies
          # the rounding of alpha * x (the op rounds twice)
          {x, xv} = rand_tensor(shape, type, device, positive: true)
          {y, yv} = rand_tensor(shape, type, device, positive: true)

          {y, yv} =
            if float?(type) and alpha < 0,
              do: {Ops.negate(y), Enum.map(yv, &(-&1))},
              else: {y, yv}

          {y, yv} = if float?(type), do: {y, yv}, else: rand_tensor(shape, type, device)
          out = Ops.axpy(alpha, x, y)
          assert %Tensor{shape: ^shape, type: ^type, device: ^device} = out

          ref =
            Enum.zip_with(xv, yv, fn a, b ->
              if float?(type), do: alpha * a + b, else: wrap(alpha * a + b, type)
            end)

          assert_matches(read(out), ref, type, :elementwise, "axpy #{alpha} #{inspect(shape)}")
        end
      end

      test "cast between float types on random data", %{device: device} do
        for src <- float_types(), dst <- float_types() do
          {t, vals} = rand_tensor({7, 9}, src, device, lo: 1.0e-3, hi: 1.0e3)
          out = Ops.cast(t, dst)
          assert %Tensor{shape: {7, 9}, type: ^dst, device: ^device} = out
          # the result is the input rounded to dst: within dst's tolerance
          tol_type =
            cond do
              {:bf, 16} in [src, dst] -> {:bf, 16}
              {:f, 16} in [src, dst] -> {:f, 16}
              true -> {:f, 32}
            end

          assert_matches(
            read(out),
            vals,
            tol_type,
            :elementwise,
            "cast #{inspect(src)} -> #{inspect(dst)}"
          )
        end
      end

      test "integer <-> float casts are exact for representable values", %{device: device} do
        for src <- int_types(), dst <- float_types() do
          {t, vals} = rand_tensor({5, 5}, src, device, small: true)
          assert read(Ops.cast(t, dst)) == Enum.map(vals, &(&1 * 1.0))
          back = Ops.cast(Ops.cast(t, dst), src)
          assert read(back) == vals
        end
      end

      for op <- [:sum, :mean, :max] do
        @tag op: op
        test "#{op} over everything and over each axis (negative axes too)",
             %{device: device, op: op} do
          types = if op == :mean, do: float_types(), else: all_types()

          for type <- types,
              shape <- [
                {},
                {1},
                {7},
                {2, 3, 5},
                {4, 1, 3, 2},
                {3, 17},
                {2, 1, 1, 2, 1, 1, 1, 3},
                {61, 151}
              ] do
            # positive data for sums, so the reference sum has no cancellation
            opts = if op == :max, do: [], else: [positive: true]
            {t, vals} = rand_tensor(shape, type, device, opts)
            rank = tuple_size(shape)
            axes = [nil | Enum.to_list(0..(rank - 1)//1) ++ Enum.to_list(-rank..-1//1)]
            # a sum over all 9211 elements of the big shape exceeds what
            # sequential fp32 accumulation promises; reduce it by axis only
            axes = if numel(shape) > 1000, do: List.delete(axes, nil), else: axes

            for axis <- axes do
              out = apply(Ops, op, [t, [axis: axis]])
              {ref, ref_shape} = ref_reduce(op, vals, shape, axis, type)
              assert %Tensor{shape: ^ref_shape, type: ^type, device: ^device} = out

              assert_matches(
                read(out),
                ref,
                type,
                :reduction,
                "#{op} #{inspect(shape)} axis #{inspect(axis)}"
              )
            end

            if numel(shape) <= 1000 do
              {ref, {}} = ref_reduce(op, vals, shape, nil, type)
              assert_matches(read(apply(Ops, op, [t])), ref, type, :reduction, "#{op} default")
            end
          end
        end
      end

      test "integer sums wrap", %{device: device} do
        t = make([2_147_483_647, 1, 2_147_483_647, 2], {:s, 32}, {2, 2}, device)
        assert read(Ops.sum(t)) == [wrap(2 * 2_147_483_647 + 3, {:s, 32})]
        assert read(Ops.sum(t, axis: 0)) == [-2, 3]
        assert read(Ops.sum(t, axis: 1)) == [-2_147_483_648, -2_147_483_647]
        u = make([200, 100, 255], {:u, 8}, {3}, device)
        assert read(Ops.sum(u)) == [wrap(555, {:u, 8})]
      end

      test "reductions of empty tensors", %{device: device} do
        for type <- all_types() do
          assert read(Ops.sum(Tensor.zeros({0}, type: type, device: device))) ==
                   quantize_all([0], type)

          z = Tensor.zeros({3, 0}, type: type, device: device)
          assert %Tensor{shape: {3}} = s1 = Ops.sum(z, axis: 1)
          assert read(s1) == quantize_all([0, 0, 0], type)
          assert %Tensor{shape: {0}} = s0 = Ops.sum(z, axis: 0)
          assert read(s0) == []
          assert Ops.max(z, axis: 0).shape == {0}
          assert_raise ArgumentError, ~r/max/, fn -> Ops.max(z, axis: 1) end
          assert_raise ArgumentError, ~r/max/, fn -> Ops.max(z) end
        end

        for type <- float_types() do
          z = Tensor.zeros({2, 0}, type: type, device: device)
          assert read(Ops.mean(z, axis: 1)) == [:nan, :nan]
          assert read(Ops.mean(z)) == [:nan]
        end
      end

      test "a chain of ops stays on the device and matches the reference", %{device: device} do
        for type <- float_types() do
          {x, xv} = rand_tensor({4, 6, 8}, type, device, positive: true)
          {b, bv} = rand_tensor({8}, type, device, positive: true)

          out =
            x
            |> Ops.multiply(2.0)
            |> Ops.add(b)
            |> Ops.sqrt()
            |> Ops.sum(axis: -1)

          assert out.device == device

          # the reference rounds to the type after every elementwise op, as the device does
          q = &quantize(&1, type)
          xt = List.to_tuple(xv)
          bt = List.to_tuple(bv)

          ref =
            for r <- 0..23 do
              Enum.sum(
                for k <- 0..7, do: q.(:math.sqrt(q.(q.(2.0 * elem(xt, r * 8 + k)) + elem(bt, k))))
              )
            end

          assert_matches(read(out), ref, type, :reduction, "chain")
        end
      end
    end
  end
end
