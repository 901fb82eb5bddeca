defmodule Mambex.UpgradeTest do
  # Reloading Mambex.NIF (what `recompile` or `r Mambex.NIF` does in iex)
  # runs the NIF's upgrade callback: tensors made before stay valid, memory
  # accounting carries over, and the new code works. Not async: it swaps the
  # module's code under every other test.
  use ExUnit.Case, async: false

  alias Mambex.{Ops, Tensor}

  test "reloading the NIF module keeps tensors and statistics valid" do
    t = Tensor.iota({4})
    before = Mambex.memory_stats(:cpu)

    assert {:module, Mambex.NIF} = :code.load_file(Mambex.NIF)

    assert Tensor.to_flat_list(Ops.add(t, 1)) == [1.0, 2.0, 3.0, 4.0]
    u = Tensor.ones({4})
    after_reload = Mambex.memory_stats(:cpu)
    assert after_reload.live_handles >= before.live_handles + 1
    assert after_reload.live_bytes >= before.live_bytes + 16

    _ = :code.soft_purge(Mambex.NIF)
    assert Tensor.to_flat_list(Ops.subtract(u, t)) == [1.0, 0.0, -1.0, -2.0]
    Tensor.free(u)
    assert Mambex.memory_stats(:cpu).live_handles >= before.live_handles
  end
end
