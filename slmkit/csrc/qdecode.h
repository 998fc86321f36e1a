// Products on int8 / int4 weight blocks for the C++ decode step (qdecode.cpp, used by decode.cpp).
//
// A weight format is one int64 per weight tensor: 0 float32, else kind | group << 8 with kind
// kQ8 (GGUF q8_0 layout: per group a float16 scale, then group int8 values) or kQ4 (q4_0: a
// float16 scale, then group / 2 bytes: the group's first half in the low nibbles, its second
// half in the high ones, value = scale * (nibble - 8)). group is a multiple of 32 that divides the
// row (slmkit.quant's blocks; group = the row length is one block per row).
#pragma once
#include <cstdint>

namespace slmq {

enum Kind { kF32 = 0, kQ8 = 1, kQ4 = 2 };

inline int kind_of(int64_t fmt) { return (int)(fmt & 0xFF); }
inline bool quantized(int64_t fmt) { return kind_of(fmt) == kQ8 || kind_of(fmt) == kQ4; }

// Bytes of the buffer quantize_rows fills for B rows of in values (in a multiple of 32).
int64_t xq_bytes(int64_t B, int64_t in);

// B rows of X (row stride ldx) as int8 blocks of 32 with float scales (d = max|x| / 127,
// q = x / d rounded to nearest even): the activations' side of every integer product.
void quantize_rows(const float* X, int64_t in, int64_t ldx, int64_t B, void* xq);

// Bytes of the panels pack makes of a (rows x in) matrix in format fmt.
int64_t packed_bytes(int64_t fmt, int64_t rows, int64_t in);

// slm quantize's blocks of W (rows x in, format fmt, row after row) as the panels matvec reads:
// 16 rows interleaved, per block of 32 columns their scales and their values (qdecode.cpp).
void pack(int64_t fmt, const void* src, int64_t rows, int64_t in, void* dst);

// dots[b * ldd + (j - j0)] = W[j] . X[b] for rows j0 <= j < j1 of the matrix W (format fmt, rows of
// in values, packed into panels by pack) and the B rows quantize_rows packed into xq. isa: 1 scalar, 2 AVX2,
// 3 AVX-512 (decode.cpp's Isa). Every path gives the same bits (exact integer block sums, then
// one float accumulation in a fixed order).
void matvec(int64_t fmt, int isa, const void* W, int64_t in, const void* xq, int64_t B, int64_t j0, int64_t j1,
            float* dots, int64_t ldd);

// Row `row` of W as slm quantize stores it (blocks, not panels) as float32 (the values slmkit.quant.dequantize_blocks gives).
void dequantize_row(int64_t fmt, const void* W, int64_t in, int64_t row, float* out);

}  // namespace slmq
