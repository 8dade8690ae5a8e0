// GrowableBuffer: a byte buffer whose address never changes while it grows. It reserves virtual address space once
// and maps memory into it on demand: mmap/mprotect on the host, the CUDA virtual memory API (cuMemAddressReserve +
// cuMemCreate + cuMemMap) on a GPU. Page pools built on it grow without copying pages already written, and tensor
// views taken before a growth stay valid.
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "bindings/message.h"

#ifdef FLASHCORE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cuda_runtime_api.h>
#endif

namespace flashcore::binding {
namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

#ifdef FLASHCORE_WITH_CUDA
// Driver entry points, resolved through the runtime so the extension needs no link against libcuda.
struct DriverVmm {
  decltype(&cuMemGetAllocationGranularity) granularity = nullptr;
  decltype(&cuMemAddressReserve) reserve = nullptr;
  decltype(&cuMemAddressFree) address_free = nullptr;
  decltype(&cuMemCreate) create = nullptr;
  decltype(&cuMemRelease) release = nullptr;
  decltype(&cuMemMap) map = nullptr;
  decltype(&cuMemUnmap) unmap = nullptr;
  decltype(&cuMemSetAccess) set_access = nullptr;

  static const DriverVmm& get() {
    static const DriverVmm api = [] {
      DriverVmm a;
      auto load = [](const char* name, auto& fn) {
        cudaDriverEntryPointQueryResult status;
        void* ptr = nullptr;
        const cudaError_t err = cudaGetDriverEntryPointByVersion(name, &ptr, 12000, cudaEnableDefault, &status);
        FC_CHECK(err == cudaSuccess && status == cudaDriverEntryPointSuccess && ptr != nullptr,
                    "GrowableBuffer: CUDA driver entry point ", name, " is unavailable");
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(ptr);
      };
      load("cuMemGetAllocationGranularity", a.granularity);
      load("cuMemAddressReserve", a.reserve);
      load("cuMemAddressFree", a.address_free);
      load("cuMemCreate", a.create);
      load("cuMemRelease", a.release);
      load("cuMemMap", a.map);
      load("cuMemUnmap", a.unmap);
      load("cuMemSetAccess", a.set_access);
      return a;
    }();
    return api;
  }
};

void check_cu(CUresult r, const char* what) {
  FC_CHECK(r == CUDA_SUCCESS, "GrowableBuffer: ", what, " failed with CUDA driver error ", static_cast<int>(r),
              r == CUDA_ERROR_OUT_OF_MEMORY ? " (out of GPU memory)" : "");
}

bool current_stream_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status) == cudaSuccess &&
         status != cudaStreamCaptureStatusNone;
}

// Memory to give back: mapped chunks from `base` on, and (free_bytes > 0) the reserved address range itself.
//
// Unmapping is not ordered with the device's streams: a kernel still queued or running when its memory is unmapped
// faults (an illegal memory access). The host often runs ahead: CUDA-graph decode steps are queued without a sync,
// and a PagedKVCache can die while its last steps still run. So memory is unmapped only once the device is idle:
// right after a device synchronize, or, inside a graph capture (where waiting is not allowed), at the next grow or
// unmapping outside one.
struct Unmapping {
  c10::DeviceIndex device;
  CUdeviceptr base;
  std::vector<CUmemGenericAllocationHandle> chunks;
  std::vector<int64_t> chunk_sizes;
  int64_t free_bytes;

  // Unmaps and releases every chunk (and frees the address range); errors are reported through the result.
  CUresult apply() const {
    const auto& api = DriverVmm::get();
    CUresult result = CUDA_SUCCESS;
    int64_t offset = 0;
    for (size_t i = 0; i < chunks.size(); ++i) {
      const CUresult unmapped = api.unmap(base + offset, chunk_sizes[i]);
      const CUresult released = api.release(chunks[i]);
      if (result == CUDA_SUCCESS) result = unmapped != CUDA_SUCCESS ? unmapped : released;
      offset += chunk_sizes[i];
    }
    if (free_bytes > 0) {
      const CUresult freed = api.address_free(base, free_bytes);
      if (result == CUDA_SUCCESS) result = freed;
    }
    return result;
  }
};

std::mutex& deferred_mutex() {
  static std::mutex m;
  return m;
}

std::vector<Unmapping>& deferred_unmappings() {
  static auto* pending = new std::vector<Unmapping>();  // never destroyed: buffers may die at process exit
  return *pending;
}

// Unmaps what was retired during a graph capture, once the current stream no longer captures.
void finish_deferred_unmappings() {
  std::vector<Unmapping> ready;
  {
    const std::lock_guard<std::mutex> lock(deferred_mutex());
    if (deferred_unmappings().empty() || current_stream_capturing()) return;
    ready.swap(deferred_unmappings());
  }
  for (const auto& u : ready) {
    const c10::cuda::CUDAGuard guard(u.device);
    cudaDeviceSynchronize();
    u.apply();
  }
}

// Gives `u` back once every kernel queued on its device so far has finished (now, or deferred during a capture).
// Called from destructors too: it never throws, so a failure leaves the memory mapped rather than unmapped early.
void retire(Unmapping u) {
  if (current_stream_capturing()) {
    const std::lock_guard<std::mutex> lock(deferred_mutex());
    deferred_unmappings().push_back(std::move(u));
    return;
  }
  if (cudaDeviceSynchronize() != cudaSuccess) return;
  u.apply();
  finish_deferred_unmappings();
}
#endif

struct GrowableBuffer : torch::CustomClassHolder {
  GrowableBuffer(const std::string& device, int64_t reserve_bytes) : device_(device) {
    FC_CHECK(reserve_bytes > 0, "GrowableBuffer: reserve_bytes must be > 0, got ", reserve_bytes);
    FC_CHECK(device_.is_cpu() || device_.is_cuda(), "GrowableBuffer: device must be cpu or cuda, got ", device);
    if (device_.is_cpu()) {
      granularity_ = sysconf(_SC_PAGESIZE);
      reserved_ = round_up(reserve_bytes, granularity_);
      void* p = mmap(nullptr, reserved_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      FC_CHECK(p != MAP_FAILED, "GrowableBuffer: could not reserve ", reserved_, " bytes of address space");
      base_ = p;
      return;
    }
#ifdef FLASHCORE_WITH_CUDA
    if (!device_.has_index()) device_ = at::Device(at::kCUDA, 0);
    const c10::cuda::CUDAGuard guard(device_);
    const auto& api = DriverVmm::get();
    size_t gran = 0;
    const CUmemAllocationProp prop = allocation_prop();
    check_cu(api.granularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED), "cuMemGetAllocationGranularity");
    granularity_ = static_cast<int64_t>(gran);
    reserved_ = round_up(reserve_bytes, granularity_);
    CUdeviceptr ptr = 0;
    check_cu(api.reserve(&ptr, reserved_, granularity_, 0, 0), "cuMemAddressReserve");
    base_ = reinterpret_cast<void*>(ptr);
#else
    FC_CHECK(false, "GrowableBuffer: this build of flashcore has no CUDA support");
#endif
  }

  ~GrowableBuffer() override {
    if (base_ == nullptr) return;
    if (device_.is_cpu()) {
      munmap(base_, reserved_);
      return;
    }
#ifdef FLASHCORE_WITH_CUDA
    try {
      const c10::cuda::CUDAGuard guard(device_);
      retire(Unmapping{device_.index(), reinterpret_cast<CUdeviceptr>(base_), std::move(chunks_),
                       std::move(chunk_sizes_), reserved_});
    } catch (...) {
      // The device cannot be selected (a fault left the context unusable, or the process is exiting): the memory
      // goes with the context; a destructor must not throw.
    }
#endif
  }

  // Maps memory until at least min_bytes are usable; never moves existing bytes. Returns the mapped size.
  int64_t grow(int64_t min_bytes) {
    FC_CHECK(min_bytes <= reserved_, "GrowableBuffer: cannot grow to ", min_bytes, " bytes; only ", reserved_,
                " bytes of address space were reserved");
    if (min_bytes <= mapped_) return mapped_;
    const int64_t target = round_up(min_bytes, granularity_);
    if (device_.is_cpu()) {
      FC_CHECK(mprotect(base_, target, PROT_READ | PROT_WRITE) == 0, "GrowableBuffer: could not map ", target,
                  " bytes of host memory");
      mapped_ = target;
      return mapped_;
    }
#ifdef FLASHCORE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(device_);
    finish_deferred_unmappings();
    const auto& api = DriverVmm::get();
    const int64_t size = target - mapped_;
    const CUmemAllocationProp prop = allocation_prop();
    CUmemGenericAllocationHandle handle;
    check_cu(api.create(&handle, size, &prop, 0), "cuMemCreate");
    const auto where = reinterpret_cast<CUdeviceptr>(base_) + mapped_;
    const CUresult mapped = api.map(where, size, 0, handle, 0);
    if (mapped != CUDA_SUCCESS) api.release(handle);
    check_cu(mapped, "cuMemMap");
    CUmemAccessDesc access = {};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device_.index();
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    const CUresult granted = api.set_access(where, size, &access, 1);
    if (granted != CUDA_SUCCESS) {
      api.unmap(where, size);
      api.release(handle);
    }
    check_cu(granted, "cuMemSetAccess");
    chunks_.push_back(handle);
    chunk_sizes_.push_back(size);
    mapped_ = target;
#endif
    return mapped_;
  }

  // Returns every mapped byte to the system; the address range stays reserved, so a later grow maps memory at the
  // same addresses again. Views taken before must not be used until then. Kernels already queued finish first (the
  // device is synchronized); inside a graph capture nothing is unmapped.
  void release_memory() {
    if (mapped_ == 0) return;
    if (device_.is_cpu()) {
      madvise(base_, mapped_, MADV_DONTNEED);
      FC_CHECK(mprotect(base_, mapped_, PROT_NONE) == 0, "GrowableBuffer: could not unmap host memory");
      mapped_ = 0;
      return;
    }
#ifdef FLASHCORE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(device_);
    // Inside a graph capture the device cannot be waited for: the memory stays mapped (and usable) instead.
    if (current_stream_capturing()) return;
    const cudaError_t idle = cudaDeviceSynchronize();
    FC_CHECK(idle == cudaSuccess, "GrowableBuffer: waiting for the device's queued kernels before unmapping failed: ",
             cudaGetErrorString(idle));
    const Unmapping mapped{device_.index(), reinterpret_cast<CUdeviceptr>(base_), std::move(chunks_),
                           std::move(chunk_sizes_), 0};
    chunks_.clear();
    chunk_sizes_.clear();
    mapped_ = 0;
    check_cu(mapped.apply(), "cuMemUnmap/cuMemRelease");
    finish_deferred_unmappings();
#endif
  }

  // A uint8 tensor over the first nbytes (which must be mapped); it keeps the buffer alive.
  at::Tensor view(int64_t nbytes) {
    FC_CHECK(nbytes >= 0 && nbytes <= mapped_, "GrowableBuffer: view of ", nbytes, " bytes but only ", mapped_,
                " are mapped; call grow first");
    auto keep_alive = c10::intrusive_ptr<GrowableBuffer>::reclaim_copy(this);
    return at::from_blob(base_, {nbytes}, [keep_alive](void*) mutable { keep_alive.reset(); },
                         at::TensorOptions().dtype(at::kByte).device(device_));
  }

  int64_t mapped_bytes() const { return mapped_; }
  int64_t reserved_bytes() const { return reserved_; }
  int64_t granularity() const { return granularity_; }

 private:
#ifdef FLASHCORE_WITH_CUDA
  CUmemAllocationProp allocation_prop() const {
    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device_.index();
    return prop;
  }
  std::vector<CUmemGenericAllocationHandle> chunks_;
  std::vector<int64_t> chunk_sizes_;
#endif
  at::Device device_;
  void* base_ = nullptr;
  int64_t reserved_ = 0;
  int64_t mapped_ = 0;
  int64_t granularity_ = 1;
};

}  // namespace
}  // namespace flashcore::binding

TORCH_LIBRARY_FRAGMENT(flashcore, m) {
  using flashcore::binding::GrowableBuffer;
  m.class_<GrowableBuffer>("GrowableBuffer")
      .def(torch::init<std::string, int64_t>())
      .def("grow", &GrowableBuffer::grow)
      .def("view", &GrowableBuffer::view)
      .def("release_memory", &GrowableBuffer::release_memory)
      .def("mapped_bytes", &GrowableBuffer::mapped_bytes)
      .def("reserved_bytes", &GrowableBuffer::reserved_bytes)
      .def("granularity", &GrowableBuffer::granularity);
}
