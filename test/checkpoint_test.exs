defmodule Mambex.CheckpointTest do
  # async: false: the test counts atoms, which concurrent modules may create
  use ExUnit.Case, async: false

  alias Mambex.{Checkpoint, Tensor}
  import Mambex.TestHelpers

  defp sample(ctx) do
    seed_rand(ctx)

    tensors = %{
      "a.weight" => elem(rand_tensor({3, 5}, {:f, 32}, :cpu), 0),
      "b" => elem(rand_tensor({7}, {:f, 64}, :cpu), 0),
      "scalar" => Tensor.fill({}, 42, type: {:s, 32}),
      "bytes" => Tensor.iota({2, 2, 2}, type: {:u, 8}),
      "half" => elem(rand_tensor({4}, {:bf, 16}, :cpu), 0),
      "empty" => Tensor.zeros({0, 3})
    }

    {tensors, %{"step" => 12, "lr" => 1.5e-3, "négatif" => -7}}
  end

  test "round trip keeps names, shapes, types, bytes and numbers", ctx do
    {tensors, numbers} = sample(ctx)
    path = Path.join(System.tmp_dir!(), "mambex_ckpt_#{System.unique_integer([:positive])}.bin")
    assert :ok = Checkpoint.write(path, tensors, numbers)
    assert {:ok, back, nums} = Checkpoint.read(path)
    File.rm!(path)
    assert nums == numbers
    assert Map.keys(back) |> Enum.sort() == Map.keys(tensors) |> Enum.sort()

    for {name, t} <- tensors do
      b = back[name]
      assert b.shape == t.shape and b.type == t.type, name
      assert Tensor.to_binary(b) == Tensor.to_binary(t), name
    end
  end

  test "every truncation and every single-byte corruption is an error, never a crash", ctx do
    {tensors, numbers} = sample(ctx)
    bin = Checkpoint.encode(tensors, numbers)
    atoms = :erlang.system_info(:atom_count)

    for n <- 0..(byte_size(bin) - 1) do
      assert {:error, msg} = Checkpoint.decode(binary_part(bin, 0, n))
      assert is_binary(msg)
    end

    for i <- 0..(byte_size(bin) - 1) do
      <<pre::binary-size(i), b, post::binary>> = bin
      assert {:error, _} = Checkpoint.decode(<<pre::binary, Bitwise.bxor(b, 0x5A), post::binary>>)
    end

    assert {:error, _} = Checkpoint.decode(bin <> <<0>>)
    assert :erlang.system_info(:atom_count) == atoms
  end

  test "structurally bad files with a valid checksum are rejected with a reason" do
    fix = fn body -> body <> <<:erlang.crc32(body)::little-32>> end
    head = "MAMBEXCK" <> <<1::little-32>>

    assert {:error, "not a Mambex checkpoint" <> _} = Checkpoint.decode(fix.("NOTMAMBX" <> <<1::little-32, 0::32, 0::32>>))
    assert {:error, "unsupported version 2"} = Checkpoint.decode(fix.("MAMBEXCK" <> <<2::little-32, 0::32, 0::32>>))
    # a tensor claiming more data than the file holds
    entry = <<1::little-16, "x", 0, 1, 1000::little-64, 4000::little-64, 0::32>>
    assert {:error, msg} = Checkpoint.decode(fix.(head <> <<0::32, 1::little-32>> <> entry))
    assert msg =~ "truncated"
    # a size that does not match the shape
    entry = <<1::little-16, "x", 0, 1, 2::little-64, 4::little-64, 0::32>>
    assert {:error, msg} = Checkpoint.decode(fix.(head <> <<0::32, 1::little-32>> <> entry))
    assert msg =~ "do not match"
    # rank over 8, unknown type, duplicate names
    entry = <<1::little-16, "x", 0, 9>>
    assert {:error, msg} = Checkpoint.decode(fix.(head <> <<0::32, 1::little-32>> <> entry))
    assert msg =~ "rank"
    entry = <<1::little-16, "x", 7, 0, 0::little-64>>
    assert {:error, msg} = Checkpoint.decode(fix.(head <> <<0::32, 1::little-32>> <> entry))
    assert msg =~ "type"
    e = <<1::little-16, "x", 4, 0, 4::little-64, 5::little-32>>
    assert {:error, msg} = Checkpoint.decode(fix.(head <> <<0::32, 2::little-32>> <> e <> e))
    assert msg =~ "duplicate"
    # a huge dimension product does not allocate
    entry = <<1::little-16, "x", 0, 2, -1::little-64, -1::little-64, 0::little-64>>
    assert {:error, _} = Checkpoint.decode(fix.(head <> <<0::32, 1::little-32>> <> entry))
  end

  test "writing rejects bad names and values" do
    assert_raise ArgumentError, ~r/names/, fn -> Checkpoint.encode(%{"" => Tensor.zeros({1})}, %{}) end
    assert_raise ArgumentError, ~r/number/, fn -> Checkpoint.encode(%{}, %{"x" => :atom}) end
  end
end
