defmodule Mambex.InspectTest do
  @moduledoc "inspect/1 of tensors: type, shape, device and values, or \"freed\"."
  use ExUnit.Case, async: true

  import Mambex.TestHelpers
  alias Mambex.Tensor

  for {label, device, tags} <- device_matrix() do
    describe "on #{label}" do
      @describetag tags
      @describetag device: device

      test "shows the type, the shape, the device and the values", %{device: device} do
        dev = if device == :cpu, do: "cpu", else: "cuda:#{elem(device, 1)}"
        t = Tensor.fill({2, 3}, 1.5, device: device)
        assert inspect(t) == "#Mambex.Tensor<f32[2][3] #{dev} [1.5, 1.5, 1.5, 1.5, 1.5, 1.5]>"

        assert inspect(Tensor.iota({4}, type: {:s, 64}, device: device)) ==
                 "#Mambex.Tensor<s64[4] #{dev} [0, 1, 2, 3]>"

        assert inspect(Tensor.iota({2}, type: {:u, 8}, device: device)) ==
                 "#Mambex.Tensor<u8[2] #{dev} [0, 1]>"

        assert inspect(Tensor.fill({}, -2.25, type: {:bf, 16}, device: device)) ==
                 "#Mambex.Tensor<bf16 #{dev} [-2.25]>"

        assert inspect(Tensor.fill({1, 1}, 0.5, type: {:f, 16}, device: device)) ==
                 "#Mambex.Tensor<f16[1][1] #{dev} [0.5]>"

        assert inspect(Tensor.fill({1}, 0.1, type: {:f, 64}, device: device)) ==
                 "#Mambex.Tensor<f64[1] #{dev} [0.1]>"

        assert inspect(Tensor.zeros({3, 0}, device: device)) ==
                 "#Mambex.Tensor<f32[3][0] #{dev} []>"
      end

      test "shows the first 16 values of a large tensor", %{device: device} do
        s = inspect(Tensor.iota({5, 7}, type: {:s, 32}, device: device))
        assert s =~ ~r/^#Mambex.Tensor<s32\[5\]\[7\] (cpu|cuda:\d+) \[0, 1, 2, .*, 15, \.\.\.\]>$/
        assert length(String.split(s, ",")) == 17
      end

      test "shows non-finite values", %{device: device} do
        bin = <<0x7FC00000::32-native, 0x7F800000::32-native, 0xFF800000::32-native>>
        s = inspect(Tensor.from_binary(bin, {:f, 32}, device: device))
        assert s =~ "[nan, infinity, neg_infinity]"
      end

      test "shows freed for a freed tensor (and a view keeps its values)", %{device: device} do
        t = Tensor.iota({2, 2}, device: device)
        v = Tensor.reshape(t, {4})
        :ok = Tensor.free(t)
        dev = if device == :cpu, do: "cpu", else: "cuda:#{elem(device, 1)}"
        assert inspect(t) == "#Mambex.Tensor<f32[2][2] #{dev} freed>"
        assert inspect(v) == "#Mambex.Tensor<f32[4] #{dev} [0.0, 1.0, 2.0, 3.0]>"
      end
    end
  end

  test "inspect honours :syntax_colors without changing the text" do
    t = Tensor.iota({2})
    plain = inspect(t)
    colored = inspect(t, syntax_colors: [list: :red])
    assert String.replace(colored, ~r/\e\[[0-9;]*m/, "") == plain
    assert read(t) == [0.0, 1.0]
  end
end
