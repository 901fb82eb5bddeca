defmodule Mambex.ViewsTest do
  @moduledoc """
  reshape (a view), slice, concatenate and transpose (copies) on every device
  against index-arithmetic references, on odd shapes and every axis.
  (That reshape shares memory in the live-bytes sense is checked in
  Mambex.MemoryTest, which measures global statistics.)
  """
  use ExUnit.Case, async: true

  import Mambex.TestHelpers
  alias Mambex.{Ops, Tensor}

  setup context, do: seed_rand(context)

  @odd_shapes [
    {7},
    {3, 5},
    {2, 3, 5},
    {4, 1, 3, 2},
    {3, 1, 4, 2, 3},
    {2, 2, 2, 2, 2, 2, 2, 2},
    {1, 1, 1, 1, 1, 1, 1, 3}
  ]

  # Slices worth trying along an axis of size d: empty at both ends, the
  # whole axis, one entry at each end, and something in the middle.
  defp slices(d) do
    [{0, 0}, {d, 0}, {0, d}, {0, 1}, {d - 1, 1}, {div(d, 2), d - div(d, 2)}, {1, max(d - 2, 0)}]
    |> Enum.filter(fn {s, l} -> s >= 0 and l >= 0 and s + l <= d end)
    |> Enum.uniq()
  end

  for {label, device, tags} <- device_matrix() do
    describe "on #{label}" do
      @describetag tags
      @describetag device: device

      test "reshape keeps the bytes, changes the shape, and chains", %{device: device} do
        for type <- all_types() do
          {t, vals} = rand_tensor({2, 3, 4}, type, device)

          for shape <- [{24}, {4, 3, 2}, {1, 24, 1}, {2, 1, 3, 1, 2, 1, 2, 1}, {24, 1}] do
            r = Tensor.reshape(t, shape)
            assert %Tensor{shape: ^shape, type: ^type, device: ^device} = r
            assert read(r) == vals
            assert read(Tensor.reshape(r, {6, 4})) == vals
          end

          {s, [v]} = rand_tensor({1, 1}, type, device)
          assert read(Tensor.reshape(s, {})) == [v]
          assert Tensor.reshape(Tensor.reshape(s, {}), {1, 1, 1}).shape == {1, 1, 1}

          assert Tensor.reshape(Tensor.zeros({3, 0}, type: type, device: device), {0, 5}).shape ==
                   {0, 5}
        end
      end

      test "a reshape view outlives the freed original", %{device: device} do
        {t, vals} = rand_tensor({3, 4}, {:f, 32}, device)
        v = Tensor.reshape(t, {12})
        :ok = Tensor.free(t)
        refute Tensor.live?(t)
        assert Tensor.live?(v)
        assert read(v) == vals
        assert read(Ops.add(v, 0.0)) == vals
        assert_raise ArgumentError, ~r/freed/, fn -> Tensor.reshape(t, {12}) end
        # freeing the view does not free a sibling view
        w = Tensor.reshape(v, {2, 6})
        :ok = Tensor.free(v)
        assert read(w) == vals
      end

      test "slice along every axis (negative too) of odd shapes", %{device: device} do
        for shape <- @odd_shapes, type <- [{:f, 32}, {:u, 8}, {:f, 64}] do
          {t, vals} = rand_tensor(shape, type, device)
          rank = tuple_size(shape)

          for axis <- Enum.to_list(0..(rank - 1)//1) ++ Enum.to_list(-rank..-1//1),
              {start, len} <- slices(elem(shape, rem(axis + rank, rank))) do
            out = Tensor.slice(t, axis, start, len)
            {ref, ref_shape} = ref_slice(vals, shape, axis, start, len)
            assert %Tensor{shape: ^ref_shape, type: ^type, device: ^device} = out

            assert read(out) == ref,
                   "slice #{inspect(shape)} axis #{axis} start #{start} len #{len}"
          end
        end
      end

      test "slice of every type and of a large tensor", %{device: device} do
        for type <- all_types() do
          {t, vals} = rand_tensor({5, 7, 3}, type, device)
          {ref, _} = ref_slice(vals, {5, 7, 3}, 1, 2, 4)
          assert read(Tensor.slice(t, 1, 2, 4)) == ref
        end

        {t, vals} = rand_tensor({300, 301}, {:f, 32}, device)
        {ref, _} = ref_slice(vals, {300, 301}, 1, 17, 250)
        assert read(Tensor.slice(t, 1, 17, 250)) == ref
        {ref, _} = ref_slice(vals, {300, 301}, 0, 1, 299)
        assert read(Tensor.slice(t, 0, 1, 299)) == ref
      end

      test "slice of zero-sized tensors", %{device: device} do
        t = Tensor.zeros({3, 0}, device: device)
        assert Tensor.slice(t, 0, 1, 2).shape == {2, 0}
        assert Tensor.slice(t, 1, 0, 0).shape == {3, 0}
      end

      test "concatenate along every axis, with differing and empty lengths",
           %{device: device} do
        for base <- [{2, 3, 5}, {3, 1, 4, 2}, {7}], type <- [{:f, 32}, {:s, 64}, {:bf, 16}] do
          rank = tuple_size(base)

          for axis <- Enum.to_list(0..(rank - 1)//1) ++ Enum.to_list(-rank..-1//1) do
            a = rem(axis + rank, rank)

            for lengths <- [[elem(base, a)], [1, elem(base, a)], [2, 0, 3], [3, 1, 1, 2]] do
              parts =
                for l <- lengths do
                  shape = put_elem(base, a, l)
                  {t, v} = rand_tensor(shape, type, device)
                  {t, {v, shape}}
                end

              out = Tensor.concatenate(Enum.map(parts, &elem(&1, 0)), axis)
              {ref, ref_shape} = ref_concatenate(Enum.map(parts, &elem(&1, 1)), axis)
              assert %Tensor{shape: ^ref_shape, type: ^type, device: ^device} = out

              assert read(out) == ref,
                     "concatenate #{inspect(base)} axis #{axis} lengths #{inspect(lengths)}"
            end
          end
        end
      end

      test "concatenate defaults to axis 0, takes every type, and the same tensor twice",
           %{device: device} do
        for type <- all_types() do
          {a, av} = rand_tensor({2, 3}, type, device)
          {b, bv} = rand_tensor({1, 3}, type, device)
          assert read(Tensor.concatenate([a, b])) == av ++ bv
          assert read(Tensor.concatenate([a, a], 0)) == av ++ av
          assert read(Tensor.concatenate([a])) == av
        end

        {big, bv} = rand_tensor({200, 301}, {:f, 32}, device)
        {small, sv} = rand_tensor({200, 2}, {:f, 32}, device)
        out = Tensor.concatenate([big, small], 1)
        {ref, {200, 303}} = ref_concatenate([{bv, {200, 301}}, {sv, {200, 2}}], 1)
        assert read(out) == ref
      end

      test "transpose reverses the axes by default", %{device: device} do
        for shape <- [
              {},
              {7},
              {3, 5},
              {2, 3, 5},
              {2, 2, 2, 2, 2, 2, 2, 2},
              {1, 2, 1, 3, 1, 2, 1, 2}
            ],
            type <- all_types() do
          {t, vals} = rand_tensor(shape, type, device)
          rank = tuple_size(shape)
          perm = Enum.to_list((rank - 1)..0//-1)
          {ref, ref_shape} = ref_transpose(vals, shape, perm)
          out = Tensor.transpose(t)
          assert %Tensor{shape: ^ref_shape, type: ^type, device: ^device} = out
          assert read(out) == ref, "transpose #{inspect(shape)} #{inspect(type)}"
        end
      end

      test "transpose with every permutation of rank 3 and 4 (tuples and lists)",
           %{device: device} do
        for shape <- [{2, 3, 5}, {3, 1, 4, 2}, {2, 3, 4, 5}],
            type <- [{:f, 32}, {:f, 16}, {:s, 64}, {:u, 8}] do
          {t, vals} = rand_tensor(shape, type, device)

          for perm <- permutations(Enum.to_list(0..(tuple_size(shape) - 1))) do
            {ref, ref_shape} = ref_transpose(vals, shape, perm)
            out = Tensor.transpose(t, List.to_tuple(perm))
            assert %Tensor{shape: ^ref_shape} = out
            assert read(out) == ref, "transpose #{inspect(shape)} #{inspect(perm)}"
            assert read(Tensor.transpose(t, perm)) == ref
          end
        end
      end

      test "transpose of zero-sized and large tensors", %{device: device} do
        t = Tensor.zeros({3, 0, 2}, device: device)
        assert Tensor.transpose(t, {2, 0, 1}).shape == {2, 3, 0}

        {t, vals} = rand_tensor({150, 301}, {:f, 32}, device)
        {ref, _} = ref_transpose(vals, {150, 301}, [1, 0])
        assert read(Tensor.transpose(t)) == ref
      end

      test "views and copies compose with ops", %{device: device} do
        {t, vals} = rand_tensor({4, 6}, {:f, 64}, device)
        out = t |> Tensor.transpose() |> Tensor.reshape({2, 12}) |> Tensor.slice(1, 3, 5)
        {tr, _} = ref_transpose(vals, {4, 6}, [1, 0])
        {ref, {2, 5}} = ref_slice(tr, {2, 12}, 1, 3, 5)
        assert read(out) == ref
        assert read(Ops.multiply(out, out)) == Enum.map(ref, &(&1 * &1))
      end
    end
  end
end
