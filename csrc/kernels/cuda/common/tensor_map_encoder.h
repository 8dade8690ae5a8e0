// The driver's cuTensorMapEncodeTiled (TMA tensor maps), found once through the runtime's entry-point query so that
// the extension needs no link against libcuda. Host code, shared by the kernels that load with TMA.
#pragma once
#include <cudaTypedefs.h>

namespace flashcore {

// nullptr when the driver lacks it (callers then take their non-TMA path or report the call unsupported).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder();

}  // namespace flashcore
