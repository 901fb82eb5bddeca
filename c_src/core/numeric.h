/*
 * numeric.h: scalar helpers shared by the CPU backend (C11) and the CUDA
 * backend (CUDA C), so that both compute the same bits where they can:
 * the counter-based random generator and the bf16/f16 <-> f32 conversions
 * (round to nearest even, NaN kept quiet).
 */
#ifndef MAMBEX_NUMERIC_H
#define MAMBEX_NUMERIC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define MX_HD __host__ __device__ __forceinline__
#else
#define MX_HD static inline
#endif

/* splitmix64 finaliser: a bijective 64-bit mix. */
MX_HD uint64_t mx_mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

/* The k-th 64-bit random word of stream `seed`. */
MX_HD uint64_t mx_rand_word(uint64_t seed, uint64_t k) {
  return mx_mix64(mx_mix64(seed ^ 0x9e3779b97f4a7c15ULL) + k * 0x9e3779b97f4a7c15ULL);
}

/* Uniform double in [0, 1) with 53 random bits. */
MX_HD double mx_rand_unit(uint64_t seed, uint64_t k) {
  return (double)(mx_rand_word(seed, k) >> 11) * (1.0 / 9007199254740992.0);
}

static const double MX_TWO_PI = 6.283185307179586476925286766559;

/* f32 <-> bf16 (the top 16 bits of an f32), round to nearest even. */
MX_HD uint16_t mx_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

MX_HD float mx_bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* f32 <-> IEEE binary16, round to nearest even, subnormals and inf kept. */
MX_HD uint16_t mx_f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);          /* NaN */
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);         /* overflow -> inf */
  if (ax < 0x38800000u) {                                            /* subnormal or zero */
    if (ax < 0x33000000u) return (uint16_t)sign;                     /* below half the tiniest */
    uint32_t e = ax >> 23;
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;                                        /* 14 + (112 - e) + 1 */
    uint32_t half = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t mid = 1u << (shift - 1u);
    if (rem > mid || (rem == mid && (half & 1u))) half++;
    return (uint16_t)(sign | half);
  }
  uint32_t r = ax - 0x38000000u;                                      /* rebias 127 -> 15 */
  uint32_t half = r >> 13;
  uint32_t rem = r & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) half++;
  return (uint16_t)(sign | half);
}

MX_HD float mx_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  uint32_t u;
  if (e == 0) {
    if (m == 0) {
      u = sign;
    } else { /* subnormal: normalise */
      e = 113;
      while (!(m & 0x400u)) { m <<= 1; e--; }
      m &= 0x3ffu;
      u = sign | (e << 23) | (m << 13);
    }
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13);
  } else {
    u = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* f64 -> f32 rounded to odd: truncate toward zero and set the last bit when
 * inexact. Rounding that float once more to bf16 or f16 (nearest even) then
 * gives the correctly rounded f64 -> bf16/f16 result (no double rounding). */
MX_HD float mx_f64_to_f32_odd(double d) {
  float f = (float)d;
  if (d != d || (double)f == d) return f;
  uint32_t u;
  if (f == INFINITY || f == -INFINITY) { /* beyond the f32 range: the largest finite, odd */
    u = d > 0 ? 0x7f7fffffu : 0xff7fffffu;
  } else {
    memcpy(&u, &f, 4);
    double af = f < 0 ? -(double)f : (double)f, ad = d < 0 ? -d : d;
    if (af > ad) u -= 1; /* rounded away from zero: step back toward zero */
    u |= 1u;
  }
  memcpy(&f, &u, 4);
  return f;
}

/* The next representable value toward -infinity, on the bits of a
 * sign-magnitude float of 16 (bf16, f16) or 32 bits; +0 and -0 step to the
 * smallest negative subnormal. */
MX_HD uint16_t mx_step_down16(uint16_t h) {
  if ((h & 0x7fffu) == 0) return 0x8001u;
  return (h & 0x8000u) ? (uint16_t)(h + 1u) : (uint16_t)(h - 1u);
}

MX_HD float mx_step_down_f32(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) == 0) u = 0x80000001u;
  else u = (u & 0x80000000u) ? u + 1u : u - 1u;
  memcpy(&f, &u, 4);
  return f;
}

#endif /* MAMBEX_NUMERIC_H */
