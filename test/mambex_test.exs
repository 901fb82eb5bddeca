defmodule MambexTest do
  @moduledoc "The Mambex module: devices, backend information, sync, statistics, Mambex.Error."
  use ExUnit.Case, async: true

  alias Mambex.Tensor

  test "devices/0 starts with :cpu and lists every CUDA device" do
    devices = Mambex.devices()
    assert hd(devices) == :cpu
    n = Mambex.cuda_device_count()
    assert is_integer(n) and n >= 0
    assert devices == [:cpu | for(i <- 0..(n - 1)//1, do: {:cuda, i})]
  end

  test "cuda_available?/0, cuda_status/0 and default_device/0 agree" do
    assert is_boolean(Mambex.cuda_available?())
    assert Mambex.cuda_available?() == Mambex.cuda_device_count() > 0
    assert is_binary(Mambex.cuda_status()) and Mambex.cuda_status() != ""

    if Mambex.cuda_available?() do
      assert Mambex.default_device() == {:cuda, 0}
    else
      assert Mambex.default_device() == :cpu
      assert Mambex.devices() == [:cpu]
    end
  end

  test "device_name/1 names every device" do
    assert Mambex.device_name(:cpu) == "cpu"

    for d <- Mambex.devices() do
      name = Mambex.device_name(d)
      assert is_binary(name) and name != ""
    end
  end

  test "sync/1 takes a device or a tensor" do
    for d <- Mambex.devices() do
      assert Mambex.sync(d) == :ok
      assert Mambex.sync(Tensor.iota({3}, device: d)) == :ok
    end
  end

  test "memory_stats/1 reports four non-negative integers per device" do
    for d <- Mambex.devices() do
      s = Mambex.memory_stats(d)

      assert Map.keys(s) |> Enum.sort() == [
               :live_bytes,
               :live_handles,
               :peak_bytes,
               :total_allocs
             ]

      assert Enum.all?(Map.values(s), &(is_integer(&1) and &1 >= 0))
    end
  end

  test "Mambex.Error is an exception with kind, op and message" do
    e = %Mambex.Error{kind: :runtime, op: "add", message: "add: boom"}
    assert Exception.exception?(e)
    assert Exception.message(e) == "add: boom"
    assert Map.keys(Map.from_struct(e)) |> Enum.sort() == [:__exception__, :kind, :message, :op]
    assert_raise Mambex.Error, "add: boom", fn -> raise e end

    assert_raise Mambex.Error, "x", fn ->
      raise Mambex.Error, message: "x", kind: :device_lost, op: "x"
    end
  end

  test "running out of memory raises Mambex.Error naming the op" do
    for {op, fun} <- [
          {"fill", fn -> Tensor.fill({2 ** 58}, 1.0) end},
          {"iota", fn -> Tensor.iota({2 ** 58}) end},
          {"random", fn -> Tensor.random_uniform({2 ** 58}, seed: 1) end}
        ] do
      e = assert_raise Mambex.Error, fun
      assert e.kind == :out_of_memory
      assert e.op == op
      assert e.message =~ ~r/^#{op}: /
    end

    # and the library still works
    assert Tensor.to_binary(Tensor.ones({2}, type: {:u, 8})) == <<1, 1>>
  end
end
