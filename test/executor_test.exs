defmodule Mambex.ExecutorTest do
  # The executor mode is global to the VM: async: false, and every test puts
  # the default back.
  use ExUnit.Case, async: false

  alias Mambex.{Model, Ops, Tensor}
  import Mambex.TestHelpers

  setup do
    on_exit(fn -> Mambex.set_executor(:dirty) end)
  end

  test "the mode is :dirty by default, can be switched, and rejects anything else" do
    assert Mambex.executor() == :dirty
    assert :ok = Mambex.set_executor(:inline)
    assert Mambex.executor() == :inline
    assert :ok = Mambex.set_executor(:dirty)
    assert Mambex.executor() == :dirty
    assert_raise ArgumentError, ~r/set_executor/, fn -> Mambex.set_executor(:fast) end
    assert_raise ArgumentError, ~r/set_executor/, fn -> Mambex.NIF.set_executor(:yes) end
  end

  defp work(device) do
    model = Model.new(features: 5, outputs: 6, d_model: 16, n_layers: 2, seed: 4, device: device)
    opt = Model.optimizer(model, lr: 1.0e-2, max_grad_norm: 1.0)
    x = Tensor.random_uniform({3, 7, 5}, seed: 1, min: -1.0, max: 1.0, device: device)
    y = Tensor.random_uniform({3, 7}, seed: 2, min: 0.0, max: 6.0, device: device) |> Ops.cast({:s, 32})

    losses =
      for _ <- 1..3 do
        {_m, _o, loss} = Model.train_step(model, opt, x, y)
        Tensor.to_binary(loss)
      end

    chain = Enum.reduce(1..200, Tensor.ones({64}, device: device), fn _, acc -> Ops.add(acc, 1.0) end)
    {losses, Tensor.to_binary(model.params["head.weight"]), Tensor.to_binary(chain)}
  end

  for {name, device_fun, tags} <- [{"cpu", quote(do: :cpu), []}, {"cuda", quote(do: cuda_device()), [cuda: true]}] do
    @tag tags
    test "inline and dirty give the same bits (#{name})" do
      device = unquote(device_fun)
      dirty = work(device)
      Mambex.set_executor(:inline)
      assert work(device) == dirty
    end

    @tag tags
    test "inline under many concurrent processes (#{name})" do
      device = unquote(device_fun)
      Mambex.set_executor(:inline)
      base = settled_stats(device)

      results =
        1..16
        |> Task.async_stream(fn i ->
          x = Tensor.fill({1000}, i * 1.0, device: device)
          y = Enum.reduce(1..50, x, fn _, acc -> Ops.multiply(Ops.add(acc, 1.0), 1.0) end)
          hd(read(Ops.sum(y)))
        end, max_concurrency: 16, timeout: 60_000)
        |> Enum.map(fn {:ok, v} -> v end)

      assert results == for(i <- 1..16, do: 1000.0 * (i + 50))
      after_ = settled_stats(device, base)
      assert after_.live_bytes == base.live_bytes
    end
  end
end
