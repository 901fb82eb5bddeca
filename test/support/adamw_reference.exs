defmodule Mambex.AdamWReference do
  @moduledoc """
  A plain float64 AdamW with global gradient-norm clipping, written from the
  formula in Mambex.AdamW's documentation (never from the kernels), for the
  AdamW tests. Tensors are flat lists of floats; a state is
  %{m: [[float]], v: [[float]], t: integer}.
  """

  @doc "A fresh state for parameter lists of these lengths (m = v = 0, t = 0)."
  def init(params) do
    zeros = Enum.map(params, fn p -> Enum.map(p, fn _ -> 0.0 end) end)
    %{m: zeros, v: zeros, t: 0}
  end

  @doc """
  One step. `params`, `grads`: lists of flat lists; `decay`: list of booleans;
  opts: lr, beta1, beta2, eps, weight_decay, max_norm (nil: no clipping).
  Returns {new_params, new_state, norm}.
  """
  def step(params, grads, decay, state, opts) do
    lr = Keyword.fetch!(opts, :lr)
    b1 = Keyword.fetch!(opts, :beta1)
    b2 = Keyword.fetch!(opts, :beta2)
    eps = Keyword.fetch!(opts, :eps)
    wd = Keyword.fetch!(opts, :weight_decay)
    max_norm = Keyword.get(opts, :max_norm)

    norm = grads |> List.flatten() |> Enum.map(&(&1 * &1)) |> Enum.sum() |> :math.sqrt()
    clip = if max_norm, do: min(1.0, max_norm / (norm + 1.0e-6)), else: 1.0
    t = state.t + 1
    bc1 = 1.0 - :math.pow(b1, t)
    bc2 = 1.0 - :math.pow(b2, t)

    results =
      for {{p, g}, {m, v, dec}} <-
            Enum.zip(Enum.zip(params, grads), Enum.zip([state.m, state.v, decay])) do
        rows =
          for {{pi, gi}, {mi, vi}} <- Enum.zip(Enum.zip(p, g), Enum.zip(m, v)) do
            gc = clip * gi
            m2 = b1 * mi + (1.0 - b1) * gc
            v2 = b2 * vi + (1.0 - b2) * gc * gc
            mhat = m2 / bc1
            vhat = v2 / bc2
            decay_term = if dec, do: lr * wd * pi, else: 0.0
            {pi - lr * mhat / (:math.sqrt(vhat) + eps) - decay_term, m2, v2}
          end

        {Enum.map(rows, &elem(&1, 0)), Enum.map(rows, &elem(&1, 1)), Enum.map(rows, &elem(&1, 2))}
      end

    new_params = Enum.map(results, &elem(&1, 0))
    new_state = %{m: Enum.map(results, &elem(&1, 1)), v: Enum.map(results, &elem(&1, 2)), t: t}
    {new_params, new_state, norm}
  end
end
