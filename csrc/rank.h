// The one limit on the adapter rank: the low-rank delta paths (quant_stats)
// and the subspace projection (project) both size their buffers by it.
#pragma once

namespace qtools {

constexpr int kMaxRank = 128;

}  // namespace qtools
