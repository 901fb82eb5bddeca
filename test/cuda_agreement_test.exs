defmodule Mambex.CudaAgreementTest do
  @moduledoc """
  The same op on :cpu and on {:cuda, 0} agrees: creation ops, casts, copies
  and uniform f32 samples exactly, normal samples within 1e-6 relative, and
  arithmetic within the float tolerances.
  """
  use ExUnit.Case, async: true

  import Mambex.TestHelpers
  alias Mambex.{Ops, Tensor}

  @moduletag :cuda

  setup context do
    seed_rand(context)
    {:ok, gpu: cuda_device()}
  end

  # The same values as a tensor on each device.
  defp pair(shape, type, gpu, opts \\ []) do
    vals = rand_values(numel(shape), type, opts)
    {make(vals, type, shape, :cpu), make(vals, type, shape, gpu)}
  end

  defp bytes(t), do: Tensor.to_binary(t)

  test "creation ops give identical bytes", %{gpu: gpu} do
    for type <- all_types(), shape <- [{}, {7}, {3, 5}, {2, 3, 1, 5}, {0}, {300, 301}] do
      for v <- [0, 1, 7, if(float?(type), do: -2.75, else: 100)] do
        assert bytes(Tensor.fill(shape, v, type: type)) ==
                 bytes(Tensor.fill(shape, v, type: type, device: gpu))
      end

      rank = tuple_size(shape)

      for axis <- [nil | Enum.to_list(-rank..(rank - 1)//1)] do
        assert bytes(Tensor.iota(shape, type: type, axis: axis)) ==
                 bytes(Tensor.iota(shape, type: type, axis: axis, device: gpu))
      end
    end
  end

  test "random_uniform agrees exactly for f32 (and every integer type)", %{gpu: gpu} do
    for type <- [{:f, 32}, {:s, 32}, {:s, 64}, {:u, 8}],
        {min, max} <- [{0, 1}, {-3, 5}, {0, 200}] do
      seed = :rand.uniform(2 ** 50)
      opts = [seed: seed, type: type, min: min, max: max]
      cpu = Tensor.random_uniform({1001, 3}, opts)
      dev = Tensor.random_uniform({1001, 3}, [device: gpu] ++ opts)
      assert bytes(cpu) == bytes(dev), "#{inspect(type)} [#{min}, #{max})"
    end
  end

  test "random_normal agrees within 1e-6 relative", %{gpu: gpu} do
    for type <- [{:f, 32}, {:f, 64}] do
      seed = :rand.uniform(2 ** 50)
      opts = [seed: seed, type: type, mean: 0.5, std: 2.0]
      cpu = read(Tensor.random_normal({4099}, opts))
      dev = read(Tensor.random_normal({4099}, [device: gpu] ++ opts))
      assert rel_err(dev, cpu) <= 1.0e-6

      worst =
        Enum.zip_with(dev, cpu, fn d, c -> abs(d - c) / max(abs(c), 1.0e-3) end) |> Enum.max()

      assert worst <= 1.0e-5
    end
  end

  test "casts between every pair of types give identical bytes", %{gpu: gpu} do
    for src <- all_types(), dst <- all_types() do
      opts = if float?(src), do: [lo: 0.01, hi: 200.0], else: [small: true]
      {c, d} = pair({17, 13}, src, gpu, opts)

      assert bytes(Ops.cast(c, dst)) == bytes(Ops.cast(d, dst)),
             "#{inspect(src)} -> #{inspect(dst)}"
    end
  end

  test "slice, concatenate, transpose and reshape give identical bytes", %{gpu: gpu} do
    for type <- all_types() do
      {c, d} = pair({3, 1, 4, 5}, type, gpu)

      for axis <- -4..3, {start, len} <- [{0, 1}, {0, 0}] do
        assert bytes(Tensor.slice(c, axis, start, len)) ==
                 bytes(Tensor.slice(d, axis, start, len))
      end

      assert bytes(Tensor.slice(c, 2, 1, 3)) == bytes(Tensor.slice(d, 2, 1, 3))
      assert bytes(Tensor.concatenate([c, c, c], 2)) == bytes(Tensor.concatenate([d, d, d], 2))

      for perm <- permutations([0, 1, 2, 3]) do
        assert bytes(Tensor.transpose(c, perm)) == bytes(Tensor.transpose(d, perm))
      end

      assert bytes(Tensor.reshape(d, {60})) == bytes(c)
    end

    {c, d} = pair({300, 301}, {:f, 32}, gpu)
    assert bytes(Tensor.transpose(c)) == bytes(Tensor.transpose(d))
  end

  test "elementwise ops agree within the float tolerances and exactly for integers",
       %{gpu: gpu} do
    for type <- all_types() do
      {a, ga} = pair({4, 6, 9}, type, gpu)
      {b, gb} = pair({4, 6, 9}, type, gpu)
      {v, gv} = pair({9}, type, gpu)
      s = if float?(type), do: 1.75, else: 3

      for op <- [:add, :subtract, :multiply, :divide, :maximum, :minimum],
          {x, gx, y, gy} <- [
            {a, ga, b, gb},
            {a, ga, v, gv},
            {v, gv, a, ga},
            {a, ga, s, s},
            {s, s, a, ga}
          ] do
        assert_matches(
          read(apply(Ops, op, [gx, gy])),
          read(apply(Ops, op, [x, y])),
          type,
          :elementwise,
          "#{op}"
        )
      end

      assert_matches(read(Ops.negate(ga)), read(Ops.negate(a)), type, :elementwise, "negate")

      assert_matches(
        read(Ops.axpy(2, ga, gb)),
        read(Ops.axpy(2, a, b)),
        type,
        :elementwise,
        "axpy"
      )

      if float?(type) do
        {p, gp} = pair({5, 7}, type, gpu, positive: true)

        for op <- [:exp, :log, :sqrt] do
          assert_matches(
            read(apply(Ops, op, [gp])),
            read(apply(Ops, op, [p])),
            type,
            :elementwise,
            "#{op}"
          )
        end
      end
    end
  end

  test "reductions agree", %{gpu: gpu} do
    for type <- all_types(), shape <- [{7}, {2, 3, 5}, {61, 151}, {3, 0}] do
      {c, d} = pair(shape, type, gpu, positive: true)
      rank = tuple_size(shape)
      ops = if float?(type), do: [:sum, :mean, :max], else: [:sum, :max]

      for op <- ops,
          axis <- [nil | Enum.to_list(-rank..(rank - 1)//1)],
          not (op == :max and numel(shape) == 0) do
        opts = [axis: axis]

        assert_matches(
          read(apply(Ops, op, [d, opts])),
          read(apply(Ops, op, [c, opts])),
          type,
          :reduction,
          "#{op} #{inspect(shape)} axis #{inspect(axis)}"
        )
      end
    end
  end

  test "reductions on the device are deterministic from run to run", %{gpu: gpu} do
    {_c, d} = pair({1000, 257}, {:f, 32}, gpu)
    first = bytes(Ops.sum(d))
    assert Enum.all?(1..5, fn _ -> bytes(Ops.sum(d)) == first end)
    by_axis = bytes(Ops.sum(d, axis: 0))
    assert Enum.all?(1..5, fn _ -> bytes(Ops.sum(d, axis: 0)) == by_axis end)
  end

  test "a long chain on the device matches the same chain on the CPU", %{gpu: gpu} do
    {c, d} = pair({8, 33, 64}, {:f, 32}, gpu, positive: true)
    {bc, bd} = pair({64}, {:f, 32}, gpu, positive: true)

    chain = fn x, b ->
      Enum.reduce(1..20, x, fn i, acc ->
        acc |> Ops.multiply(0.5) |> Ops.add(b) |> Ops.maximum(0.25 * i) |> Ops.sqrt()
      end)
      |> Ops.mean(axis: 1)
    end

    assert_matches(read(chain.(d, bd)), read(chain.(c, bc)), {:f, 32}, :reduction, "chain")
  end
end
