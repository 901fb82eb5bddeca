defmodule Mambex.NIF do
  @moduledoc false
  # Stubs for the C NIF (c_src/nif/mambex_nif.c). The NIF raises
  # ArgumentError for misuse and Mambex.Error for runtime failures itself.
  # Public code goes through Mambex.Tensor, Mambex.Ops and Mambex.

  @on_load :load_nif

  def load_nif do
    priv =
      case :code.priv_dir(:mambex) do
        {:error, _} -> Path.expand("../../priv", __DIR__)
        dir -> List.to_string(dir)
      end

    case :erlang.load_nif(String.to_charlist(Path.join(priv, "mambex_nif")), priv) do
      :ok -> :ok
      {:error, {:reload, _}} -> :ok
      {:error, reason} -> {:error, reason}
    end
  end

  defp nif_error, do: :erlang.nif_error(:mambex_nif_not_loaded)

  def backend_info, do: nif_error()
  def set_executor(_inline), do: nif_error()
  def executor_inline?, do: nif_error()
  def device_name(_device), do: nif_error()
  def sync(_device), do: nif_error()
  def memory_stats(_device), do: nif_error()
  def reset_peak(_device), do: nif_error()
  def from_binary(_data, _type, _shape, _device), do: nif_error()
  def to_binary(_tensor, _limit), do: nif_error()
  def to_device(_tensor, _device), do: nif_error()
  def free(_tensor), do: nif_error()
  def live?(_tensor), do: nif_error()
  def fill(_shape, _type, _device, _value), do: nif_error()
  def iota(_shape, _type, _device, _axis), do: nif_error()
  def random(_shape, _type, _device, _seed, _dist, _a, _b), do: nif_error()
  def reshape(_tensor, _shape), do: nif_error()
  def slice(_tensor, _axis, _start, _len), do: nif_error()
  def concatenate(_tensors, _axis), do: nif_error()
  def permute(_tensor, _axes), do: nif_error()
  def cast(_tensor, _type), do: nif_error()
  def unary(_op, _tensor), do: nif_error()
  def binary(_op, _a, _b), do: nif_error()
  def axpy(_alpha, _x, _y), do: nif_error()
  def reduce(_op, _tensor, _axis), do: nif_error()
  def event_record(_device), do: nif_error()
  def event_elapsed(_start, _end), do: nif_error()
  def spin(_device, _us), do: nif_error()

  def scan_forward(_u, _delta, _a, _b, _c, _d, _z, _delta_bias, _softplus, _h0, _reset, _ckpt),
    do: nif_error()

  def scan_backward(_u, _delta, _a, _b, _c, _d, _z, _delta_bias, _softplus, _h0, _reset, _d_out,
        _d_final_state, _ckpt),
      do: nif_error()

  def adamw_step(_params, _grads, _ms, _vs, _decay, _step, _lr, _want_norm, _hyper),
    do: nif_error()

  def infer(_cfg, _top, _layers, _x, _reset, _states, _in_place), do: nif_error()
  def infer_plan_new(_cfg, _top, _layers, _states), do: nif_error()
  def infer_plan_step(_plan, _frames, _resets), do: nif_error()
  def infer_plan_info(_plan), do: nif_error()
  def infer_plan_free(_plan), do: nif_error()
  def conv1d_forward(_x, _weight, _bias, _h0, _silu), do: nif_error()

  def conv1d_backward(_x, _weight, _bias, _h0, _silu, _d_out, _d_final_state, _into_weight,
        _into_bias, _into_h0),
      do: nif_error()
  def norm_forward(_kind, _x, _residual, _weight, _bias, _eps), do: nif_error()

  def norm_backward(_kind, _x, _weight, _bias, _mean, _rstd, _dy, _d_sum, _into_w, _into_b),
    do: nif_error()

  def act_forward(_act, _x), do: nif_error()
  def act_backward(_act, _x, _dy), do: nif_error()
  def swiglu_forward(_a, _b), do: nif_error()
  def swiglu_backward(_a, _b, _dout), do: nif_error()
  def cross_entropy(_logits, _targets, _weights, _reduction, _ignore_index, _scale, _grad),
    do: nif_error()

  def mse(_pred, _target, _reduction, _scale, _grad), do: nif_error()
  def linear_forward(_x, _w, _bias, _precision), do: nif_error()

  def linear_backward(_x, _w, _dy, _bias, _input_grad, _precision, _into_w, _into_bias, _into_x),
    do: nif_error()

  def matmul(_a, _b, _transpose_a, _transpose_b, _alpha, _beta, _into, _precision),
    do: nif_error()
end
