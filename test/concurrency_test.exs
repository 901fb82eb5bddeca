defmodule Mambex.ConcurrencyTest do
  @moduledoc """
  Many processes creating, chaining and reading tensors at once, each with
  its own data; and processes freeing a tensor while others use it, which may
  only ever succeed (with the right values) or raise ArgumentError.
  """
  use ExUnit.Case, async: true

  import Mambex.TestHelpers
  alias Mambex.{Ops, Tensor}

  @tasks 64

  defp run_all(fun, count \\ @tasks) do
    1..count
    |> Task.async_stream(fun, max_concurrency: 64, timeout: :infinity, ordered: true)
    |> Enum.map(fn {:ok, r} -> r end)
  end

  # One worker's job: its own random data, a chain of ops, the results checked
  # against the reference inside the worker. Returns :ok or a description.
  defp chain_job(i, device, base_seed) do
    seed_rand({:chain, base_seed, i})
    # sizes from tiny (inline on a normal scheduler) to ~400 KB (dirty)
    d = Enum.at([3, 17, 64, 101, 333], rem(i, 5))
    l = 1 + rem(i * 7, 13)
    shape = {2, l, d}

    Enum.reduce_while(1..6, :ok, fn round, :ok ->
      {x, xv} = rand_tensor(shape, {:f, 64}, device)
      {b, bv} = rand_tensor({d}, {:f, 64}, device)
      s = i + round / 8

      y = x |> Ops.multiply(s) |> Ops.add(b) |> Ops.maximum(0.5)
      sums = Ops.sum(y, axis: 1)
      tr = Tensor.transpose(y, {2, 0, 1})
      cat = Tensor.concatenate([y, x], 1)
      f32 = Ops.cast(y, {:f, 32})

      bt = List.to_tuple(bv)

      y_ref =
        xv
        |> Enum.with_index()
        |> Enum.map(fn {v, k} -> max(v * s + elem(bt, rem(k, d)), 0.5) end)

      {sums_ref, _} = ref_reduce(:sum, y_ref, shape, 1, {:f, 64})
      {tr_ref, _} = ref_transpose(y_ref, shape, [2, 0, 1])
      {cat_ref, _} = ref_concatenate([{y_ref, shape}, {xv, shape}], 1)

      results = [
        {"y", rel_err(read(y), y_ref) <= 1.0e-12},
        {"sums", rel_err(read(sums), sums_ref) <= 1.0e-12},
        {"transpose", read(tr) == read(y) |> ref_transpose(shape, [2, 0, 1]) |> elem(0)},
        {"transpose ref", rel_err(read(tr), tr_ref) <= 1.0e-12},
        {"concatenate", rel_err(read(cat), cat_ref) <= 1.0e-12},
        {"cast", read(f32) == quantize_all(read(y), {:f, 32})}
      ]

      case Enum.reject(results, &elem(&1, 1)) do
        [] -> {:cont, :ok}
        bad -> {:halt, {:worker, i, :round, round, :failed, Enum.map(bad, &elem(&1, 0))}}
      end
    end)
  end

  # Runs fun; :ok on success with the right value, :freed on ArgumentError,
  # anything else is a failure to report.
  defp use_outcome(fun, expected) do
    case fun.() do
      ^expected -> :ok
      other -> {:wrong_value, other |> inspect(limit: 5)}
    end
  rescue
    e in ArgumentError ->
      if Exception.message(e) =~ "freed",
        do: :freed,
        else: {:unexpected_message, Exception.message(e)}

    e ->
      {:raised, e.__struct__, Exception.message(e)}
  end

  for {label, device, tags} <- device_matrix() do
    describe "on #{label}" do
      @describetag tags
      @describetag device: device

      test "#{@tasks} processes create, chain and read their own tensors at once",
           %{device: device} do
        base = base_seed()
        results = run_all(&chain_job(&1, device, base))
        assert length(results) == @tasks
        assert Enum.reject(results, &(&1 == :ok)) == []
      end

      @tag :slow
      test "sustained load: 256 processes, each chaining ops for many rounds",
           %{device: device} do
        base = base_seed()

        results =
          1..256
          |> Task.async_stream(fn i -> Enum.map(1..5, &chain_job(i * 100 + &1, device, base)) end,
            max_concurrency: 256,
            timeout: :infinity
          )
          |> Enum.flat_map(fn {:ok, r} -> r end)

        assert length(results) == 256 * 5
        assert Enum.reject(results, &(&1 == :ok)) == []
      end

      test "many processes read and compute from one shared tensor", %{device: device} do
        seed_rand({:shared, base_seed()})
        {t, vals} = rand_tensor({256, 257}, {:f, 32}, device)
        bytes = encode(vals, {:f, 32})
        {sum_ref, _} = ref_reduce(:sum, vals, {256, 257}, 0, {:f, 32})

        results =
          run_all(fn i ->
            ok_bytes = Tensor.to_binary(t) == bytes
            v = Tensor.reshape(t, {257, 256})
            ok_view = Tensor.to_binary(v, 10) == binary_part(bytes, 0, 40)
            s = read(Ops.sum(t, axis: 0))
            ok_sum = rel_err(s, sum_ref) <= tol({:f, 32}, :reduction)

            ok_scaled =
              read(Ops.multiply(Tensor.slice(t, 0, rem(i, 256), 1), 2.0)) ==
                Enum.map(Enum.slice(vals, rem(i, 256) * 257, 257), &(&1 * 2.0))

            {ok_bytes, ok_view, ok_sum, ok_scaled}
          end)

        assert Enum.uniq(results) == [{true, true, true, true}]
      end

      test "freeing a tensor while other processes use it only ever raises ArgumentError",
           %{device: device} do
        for {shape, round} <-
              Enum.with_index([{16}, {300, 301}, {7, 5}, {200, 400}, {1}, {64, 64}]) do
          seed_rand({:free_race, base_seed(), round})
          {t, vals} = rand_tensor(shape, {:f, 32}, device, positive: true)
          view = Tensor.reshape(t, {numel(shape)})
          n = numel(shape)
          bytes = encode(vals, {:f, 32})
          doubled = encode(Enum.map(vals, &(&1 * 2)), {:f, 32})
          {sum_ref, _} = ref_reduce(:max, vals, shape, nil, {:f, 32})
          max_bytes = encode(sum_ref, {:f, 32})
          other = Tensor.ones(shape, device: device)

          uses = [
            {fn -> Tensor.to_binary(t) end, bytes},
            {fn -> Tensor.to_binary(Ops.add(t, t)) end, doubled},
            {fn -> Tensor.to_binary(Ops.multiply(2.0, t)) end, doubled},
            {fn -> Tensor.to_binary(Ops.axpy(1.0, t, t)) end, doubled},
            {fn -> Tensor.to_binary(Ops.max(t)) end, max_bytes},
            {fn -> Tensor.to_binary(Tensor.reshape(t, {n})) end, bytes},
            {fn -> Tensor.to_binary(Tensor.concatenate([t, t])) end, bytes <> bytes},
            {fn -> Tensor.to_binary(Tensor.transpose(Tensor.transpose(t))) end, bytes},
            {fn -> Tensor.to_binary(Ops.cast(Ops.cast(t, {:f, 64}), {:f, 32})) end, bytes},
            {fn -> Tensor.to_binary(Ops.subtract(Ops.add(t, other), other)) |> byte_size() end,
             byte_size(bytes)},
            {fn -> Tensor.to_binary(Tensor.to_device(t, :cpu)) end, bytes},
            {fn -> Tensor.live?(t) in [true, false] end, true},
            # a view holds the storage: it must keep working after the free
            {fn -> Tensor.to_binary(view) end, bytes}
          ]

          results =
            run_all(
              fn i ->
                if rem(i, 8) == 0 do
                  # a few freers, each freeing after a little work
                  _ = use_outcome(fn -> Tensor.to_binary(t, 1) end, binary_part(bytes, 0, 4))
                  [Tensor.free(t)]
                else
                  for k <- 1..12 do
                    {fun, expected} = Enum.at(uses, rem(i + k, length(uses)))
                    use_outcome(fun, expected)
                  end
                end
              end,
              48
            )
            |> List.flatten()

          bad = Enum.reject(results, &(&1 in [:ok, :freed]))
          assert bad == [], inspect(Enum.take(bad, 5))
          refute Tensor.live?(t)
          assert Tensor.to_binary(view) == bytes
        end
      end

      test "processes racing to free the same tensors and views", %{device: device} do
        for _round <- 1..20 do
          t = Tensor.iota({100, 100}, device: device)
          views = for s <- [{10_000}, {100, 100}, {1, 10_000}], do: Tensor.reshape(t, s)
          all = [t | views]
          # (reductions are deterministic, so every successful sum is this one)
          sum = read(Ops.sum(t))

          results =
            run_all(
              fn i ->
                x = Enum.at(all, rem(i, length(all)))

                outcome =
                  try do
                    Ops.sum(x) |> read()
                  rescue
                    ArgumentError -> :freed
                  end

                {Tensor.free(x), outcome}
              end,
              32
            )

          assert Enum.all?(results, fn {ok, o} -> ok == :ok and o in [:freed, sum] end)
          assert Enum.all?(all, &(not Tensor.live?(&1)))
        end
      end

      test "a process that dies holding tensors does not disturb the others",
           %{device: device} do
        Process.flag(:trap_exit, true)

        pids =
          for i <- 1..16 do
            spawn_link(fn ->
              _t = Tensor.iota({1000, i}, device: device)
              exit(:boom)
            end)
          end

        for pid <- pids, do: assert_receive({:EXIT, ^pid, :boom}, 5_000)
        t = Tensor.iota({5}, device: device)
        assert read(Ops.add(t, 1)) == [1.0, 2.0, 3.0, 4.0, 5.0]
      end
    end
  end
end
