defmodule Mambex.MemoryTest do
  @moduledoc """
  Memory accounting: live bytes and handles return to their starting values
  after thousands of create/op/drop cycles (error paths included), free/1
  releases at once, and reshape views share their storage.

  These tests read the global per-device statistics, so the module is
  `async: false`: ExUnit runs it after every async module has finished, and
  alone.
  """
  use ExUnit.Case, async: false

  import Mambex.TestHelpers
  alias Mambex.{Ops, Tensor}

  @cycles 10_000

  setup context, do: seed_rand(context)

  defp stats(device, target \\ nil), do: Mambex.TestHelpers.settled_stats(device, target)

  # Runs fun in a fresh process that garbage-collects itself before handing
  # back its (tensor-free) result, then waits for it to be gone.
  defp in_fresh_process(fun) do
    parent = self()

    {pid, ref} =
      spawn_monitor(fn ->
        result = fun.()
        :erlang.garbage_collect()
        send(parent, {:result, self(), result})
      end)

    receive do
      {:result, ^pid, result} ->
        receive do
          {:DOWN, ^ref, :process, ^pid, _} -> result
        end

      {:DOWN, ^ref, :process, ^pid, reason} ->
        flunk("the cycling process died: #{inspect(reason, limit: 20)}")
    end
  end

  # (a separate function, not an inlined fun: a dead local of the test body
  # could stay on its stack frame and keep the tensor reachable)
  defp allocate_and_measure(device, n \\ 1000) do
    t = Tensor.zeros({n}, device: device)
    {Mambex.memory_stats(device).live_bytes, Tensor.size(t)}
  end

  defp arg_error(fun) do
    fun.()
    :no_error
  rescue
    ArgumentError -> :ok
  end

  # One create/op/drop cycle; returns a checksum of what it read.
  defp cycle(i, device, freed) do
    a =
      Tensor.from_binary(encode([i * 1.0, 1.0, 2.0, 3.0], {:f, 32}), {:f, 32},
        shape: {2, 2},
        device: device
      )

    b = Tensor.fill({2, 2}, 0.5, device: device)
    c = a |> Ops.add(b) |> Ops.multiply(2.0) |> Ops.subtract(b) |> Ops.maximum(0.0)
    [s] = read(Ops.sum(c))

    extra =
      case rem(i, 12) do
        0 ->
          v = Tensor.reshape(c, {4})
          :ok = Tensor.free(c)
          hd(read(v))

        1 ->
          hd(read(Tensor.slice(a, 1, 1, 1)))

        2 ->
          length(read(Tensor.concatenate([a, b, a], 0)))

        3 ->
          hd(read(Tensor.transpose(a)))

        4 ->
          hd(read(Ops.cast(Ops.cast(a, {:bf, 16}), {:s, 32})))

        5 ->
          hd(read(Tensor.random_uniform({3}, seed: i, device: device)))

        6 ->
          hd(read(Tensor.iota({2, 3}, axis: 1, type: {:u, 8}, device: device)))

        7 ->
          hd(read(Tensor.to_device(a, :cpu)))

        8 ->
          hd(read(Ops.axpy(2.0, a, b)))

        9 ->
          hd(read(Ops.exp(Ops.negate(b))))

        10 ->
          hd(read(Ops.max(a, axis: -1)))

        11 ->
          t = Tensor.zeros({0, 3}, device: device)
          :ok = Tensor.free(t)
          0
      end

    # error paths, some after a storage was acquired: nothing may leak
    errors = [
      arg_error(fn -> Tensor.slice(a, 0, 1, 5) end),
      arg_error(fn -> Ops.add(a, freed) end),
      arg_error(fn -> Ops.add(freed, a) end),
      arg_error(fn -> Ops.add(a, Tensor.iota({3}, device: device)) end),
      arg_error(fn -> Ops.axpy(1.0, a, freed) end),
      arg_error(fn -> Tensor.concatenate([a, b, freed], 0) end),
      arg_error(fn -> Tensor.concatenate([a, Tensor.iota({2, 3}, device: device)], 0) end),
      arg_error(fn -> Ops.sum(a, axis: 5) end),
      arg_error(fn -> Tensor.transpose(a, {0, 0}) end),
      arg_error(fn -> Ops.mean(Tensor.iota({2}, type: {:s, 32}, device: device)) end),
      arg_error(fn -> Ops.max(Tensor.zeros({0}, device: device)) end),
      arg_error(fn -> Tensor.reshape(a, {3}) end),
      arg_error(fn -> Ops.cast(a, :bad) end),
      arg_error(fn -> Tensor.to_binary(freed) end)
    ]

    unless Enum.all?(errors, &(&1 == :ok)),
      do: raise("an error path did not raise: #{inspect(errors)}")

    if rem(i, 1000) == 0 do
      # large enough for the dirty-scheduler path
      big = Tensor.iota({300, 301}, device: device)
      _ = read(Ops.sum(Tensor.transpose(Ops.add(big, big)), axis: 0))
      # out of memory (Mambex.Error after a garbage collection and a retry)
      try do
        Tensor.fill({2 ** 58}, 0.0, device: device)
        raise "a 2^60-byte tensor was allocated"
      rescue
        e in Mambex.Error -> if e.kind != :out_of_memory, do: reraise(e, __STACKTRACE__)
      end
    end

    s + extra
  end

  for {label, device, tags} <- device_matrix() do
    describe "on #{label}" do
      @describetag tags
      @describetag device: device

      test "#{@cycles} create/op/drop cycles leave live bytes and handles unchanged",
           %{device: device} do
        before = stats(device)

        checksum =
          in_fresh_process(fn ->
            freed = Tensor.iota({2, 2}, device: device)
            :ok = Tensor.free(freed)
            Enum.reduce(1..@cycles, 0, fn i, acc -> acc + cycle(i, device, freed) end)
          end)

        assert is_number(checksum)
        after_ = stats(device, before)
        assert after_.live_bytes == before.live_bytes
        assert after_.live_handles == before.live_handles
        assert after_.total_allocs >= before.total_allocs + 10 * @cycles
      end

      @tag :slow
      test "100_000 cycles from 8 processes at once leave live bytes and handles unchanged",
           %{device: device} do
        before = stats(device)

        sums =
          in_fresh_process(fn ->
            1..8
            |> Task.async_stream(
              fn k ->
                freed = Tensor.iota({2, 2}, device: device)
                :ok = Tensor.free(freed)
                r = Enum.reduce(1..12_500, 0, fn i, acc -> acc + cycle(i + k, device, freed) end)
                :erlang.garbage_collect()
                r
              end,
              max_concurrency: 8,
              timeout: :infinity
            )
            |> Enum.map(fn {:ok, r} -> r end)
          end)

        assert length(sums) == 8
        after_ = stats(device, before)
        assert after_.live_bytes == before.live_bytes
        assert after_.live_handles == before.live_handles
      end

      test "tensors held by concurrent processes are released when they exit",
           %{device: device} do
        before = stats(device)

        in_fresh_process(fn ->
          1..32
          |> Task.async_stream(
            fn i ->
              t = Tensor.iota({100, i}, device: device)
              v = Tensor.reshape(Ops.multiply(t, 2), {i, 100})
              :erlang.garbage_collect()
              hd(read(Ops.sum(v)))
            end,
            max_concurrency: 32
          )
          |> Enum.map(fn {:ok, x} -> x end)
        end)

        after_ = stats(device, before)
        assert after_.live_bytes == before.live_bytes
        assert after_.live_handles == before.live_handles
      end

      test "free/1 releases the bytes at once", %{device: device} do
        before = stats(device)
        t = Tensor.fill({1000}, 1.0, type: {:f, 64}, device: device)
        mid = Mambex.memory_stats(device)
        assert mid.live_bytes == before.live_bytes + 8000
        assert mid.live_handles == before.live_handles + 1
        assert mid.peak_bytes >= mid.live_bytes
        :ok = Tensor.free(t)
        now = Mambex.memory_stats(device)
        assert now.live_bytes == before.live_bytes
        assert now.live_handles == before.live_handles
        # a second free changes nothing
        :ok = Tensor.free(t)
        assert Mambex.memory_stats(device).live_bytes == before.live_bytes
      end

      test "reshape is a view: no new bytes, and the storage lives while a view does",
           %{device: device} do
        before = stats(device)
        {t, vals} = rand_tensor({25, 40}, {:f, 32}, device)
        s1 = Mambex.memory_stats(device)
        assert s1.live_bytes == before.live_bytes + 4000

        v = Tensor.reshape(t, {1000})
        w = Tensor.reshape(v, {10, 10, 10})
        s2 = Mambex.memory_stats(device)
        assert s2.live_bytes == s1.live_bytes
        assert s2.live_handles == s1.live_handles + 2

        :ok = Tensor.free(t)
        s3 = Mambex.memory_stats(device)
        assert s3.live_bytes == s1.live_bytes
        assert s3.live_handles == s1.live_handles + 1
        assert read(v) == vals
        assert read(w) == vals

        :ok = Tensor.free(v)
        assert Mambex.memory_stats(device).live_bytes == s1.live_bytes
        assert read(w) == vals

        :ok = Tensor.free(w)
        s4 = Mambex.memory_stats(device)
        assert s4.live_bytes == before.live_bytes
        assert s4.live_handles == before.live_handles
      end

      test "copies (slice, concatenate, transpose, cast, to_device) own new bytes",
           %{device: device} do
        before = stats(device)
        t = Tensor.iota({10, 10}, device: device)
        base = Mambex.memory_stats(device).live_bytes
        assert base == before.live_bytes + 400
        s = Tensor.slice(t, 0, 0, 5)
        assert Mambex.memory_stats(device).live_bytes == base + 200
        c = Tensor.concatenate([t, t])
        assert Mambex.memory_stats(device).live_bytes == base + 200 + 800
        :ok = Tensor.free(t)
        # the copies do not keep the source alive
        assert Mambex.memory_stats(device).live_bytes == before.live_bytes + 200 + 800
        assert hd(read(s)) == 0.0 and length(read(c)) == 200
        Enum.each([s, c], &Tensor.free/1)
        assert Mambex.memory_stats(device).live_bytes == before.live_bytes
      end

      test "zero-sized tensors count as handles with no bytes", %{device: device} do
        before = stats(device)
        t = Tensor.zeros({3, 0}, device: device)
        s = Mambex.memory_stats(device)
        assert s.live_bytes == before.live_bytes
        assert s.live_handles == before.live_handles + 1
        :ok = Tensor.free(t)
        assert Mambex.memory_stats(device).live_handles == before.live_handles
      end

      test "reset_peak/1 sets the peak to the live bytes", %{device: device} do
        _ = stats(device)
        assert Mambex.reset_peak(device) == :ok
        s = Mambex.memory_stats(device)
        assert s.peak_bytes == s.live_bytes
        t = Tensor.zeros({250_000}, device: device)
        :ok = Tensor.free(t)
        s2 = Mambex.memory_stats(device)
        assert s2.peak_bytes >= s.live_bytes + 1_000_000
        assert s2.live_bytes == s.live_bytes
      end

      test "retry_oom releases the caller's dead tensors before it retries", %{device: device} do
        before = stats(device)
        # a dead 1 MB tensor in this process
        assert allocate_and_measure(device, 250_000) == {before.live_bytes + 1_000_000, 250_000}
        calls = :counters.new(1, [])

        seen =
          Mambex.retry_oom(fn ->
            :counters.add(calls, 1, 1)

            if :counters.get(calls, 1) == 1,
              do: raise(%Mambex.Error{kind: :out_of_memory, op: "test", message: "test: oom"}),
              else: Mambex.memory_stats(device).live_bytes
          end)

        assert :counters.get(calls, 1) == 2
        # the retry must see the memory of the dead tensor released
        assert seen == before.live_bytes
      end

      test "retry_oom re-raises other errors and a second out-of-memory", %{device: device} do
        assert_raise Mambex.Error, ~r/boom/, fn ->
          Mambex.retry_oom(fn ->
            raise %Mambex.Error{kind: :runtime, op: "x", message: "x: boom"}
          end)
        end

        assert_raise Mambex.Error, ~r/out of host memory|memory/, fn ->
          Tensor.fill({2 ** 58}, 0.0, device: device)
        end

        assert Mambex.retry_oom(fn -> :fine end) == :fine
      end

      test "a tensor dropped by a process is released by its garbage collection",
           %{device: device} do
        before = stats(device)

        # the only reference lives in a call frame that is gone once it returns
        assert allocate_and_measure(device) == {before.live_bytes + 4000, 1000}
        after_ = stats(device, before)
        assert after_.live_bytes == before.live_bytes
        assert after_.live_handles == before.live_handles
      end
    end
  end
end
