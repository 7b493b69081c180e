// The SIMT emulation runtime behind cuda_sim.h: launches, block scheduling (fibers, or OS
// threads with NANOLM_SIM_THREADS), barriers, the warp exchange and the PTX twins.
#include "cuda_sim.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace nanolm {
namespace sim {

dim3 block_idx, block_dim, grid_dim;

namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr std::size_t kDefaultDynamicSmem = 48 * 1024;  // above it a kernel must opt in
constexpr int kMaxDynamicSmemOptIn = 166912;            // sm_80's 163 KB (sm_90: 227 KB)
constexpr int kSimulatedSMs = 4;                         // what cudaDevAttrMultiProcessorCount says

struct Copy {
    unsigned char* dst;
    const unsigned char* src;
    int bytes;
    bool valid;
};

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done, Failed };

}  // namespace

struct Thread {
    dim3 idx;
    int lane = 0, warp = 0, parity = 0;
    std::vector<Copy> copies;             // cp.async issued and not yet retired, in order
    std::vector<std::size_t> group_ends;  // copies.size() at each commit_group
    State state = State::Runnable;
    ucontext_t context;
};

namespace {

struct Warp {
    alignas(16) unsigned char slots[2][kWarpSize][32];  // double-buffered: one barrier per exchange
    int size = 0, live = 0, arrived = 0;
    unsigned generation = 0;
    std::mutex mutex;
    std::condition_variable cv;
};

// The block being run: its threads, warps and barrier state.
struct Block {
    std::vector<Thread> threads;
    std::vector<std::unique_ptr<Warp>> warps;
    int live = 0, arrived = 0;
    unsigned generation = 0;
    std::mutex mutex;  // thread mode: __syncthreads is built on a mutex and condition variable,
    std::condition_variable cv;  // not std::barrier, whose shared atomics give TSan false edges
    std::string error;
    Body body = nullptr;
    void* launch = nullptr;
};

Block* g_block = nullptr;
thread_local Thread* t_current = nullptr;
std::mutex g_launch_mutex;  // one launch at a time
std::map<const void*, int> g_max_dynamic_smem;
unsigned char* g_dynamic_smem = nullptr;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;

[[noreturn]] void fail(const std::string& message);

// ----------------------------------------------------------------------------- fibers
#ifndef NANOLM_SIM_THREADS
constexpr std::size_t kFiberStack = 256 * 1024;
ucontext_t g_scheduler;

// Stacks for up to 1024 fibers, kept between launches, each with a guard page below it.
struct StackPool {
    std::vector<unsigned char*> stacks;
    unsigned char* get(std::size_t i) {
        while (stacks.size() <= i) {
            const long page = 4096;
            void* p = mmap(nullptr, kFiberStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) throw std::runtime_error("cuda_sim: cannot map a fiber stack");
            mprotect(p, page, PROT_NONE);
            stacks.push_back(static_cast<unsigned char*>(p) + page);
        }
        return stacks[i];
    }
};
StackPool g_stacks;

void suspend(State state) {
    Thread* t = t_current;
    t->state = state;
    swapcontext(&t->context, &g_scheduler);
}

void fiber_main() {
    g_block->body(g_block->launch);
    t_current->state = State::Done;  // uc_link returns to the scheduler
}

void block_barrier() { suspend(State::AtBlockBarrier); }
void warp_barrier() { suspend(State::AtWarpBarrier); }

[[noreturn]] void fail(const std::string& message) {
    if (g_block->error.empty()) g_block->error = message;
    suspend(State::Failed);
    std::abort();  // a failed fiber is never resumed
}

std::string describe_states(const Block& b) {
    std::string out;
    for (std::size_t w = 0; w < b.warps.size(); ++w) {
        int at_block = 0, at_warp = 0, done = 0;
        for (int l = 0; l < b.warps[w]->size; ++l) {
            const State s = b.threads[w * kWarpSize + l].state;
            at_block += s == State::AtBlockBarrier;
            at_warp += s == State::AtWarpBarrier;
            done += s == State::Done;
        }
        out += " warp " + std::to_string(w) + ": " + std::to_string(at_block) + " at __syncthreads, " +
               std::to_string(at_warp) + " in a warp collective, " + std::to_string(done) + " exited;";
    }
    return out;
}

// Runs every fiber until it blocks, then releases whichever barrier is complete.
void run_block(Block& b) {
    for (std::size_t i = 0; i < b.threads.size(); ++i) {
        Thread& t = b.threads[i];
        getcontext(&t.context);
        t.context.uc_stack.ss_sp = g_stacks.get(i);
        t.context.uc_stack.ss_size = kFiberStack;
        t.context.uc_link = &g_scheduler;
        makecontext(&t.context, fiber_main, 0);
    }
    for (;;) {
        for (Thread& t : b.threads) {
            if (t.state != State::Runnable) continue;
            t_current = &t;
            swapcontext(&g_scheduler, &t.context);
            t_current = nullptr;
            if (t.state == State::Failed) return;
        }
        bool released = false;
        for (std::size_t w = 0; w < b.warps.size(); ++w) {
            Thread* lanes = &b.threads[w * kWarpSize];
            int waiting = 0;
            for (int l = 0; l < b.warps[w]->size; ++l) waiting += lanes[l].state == State::AtWarpBarrier;
            if (waiting == 0) continue;
            if (waiting < b.warps[w]->size) {
                b.error = "a warp collective (__shfl_*_sync, ldmatrix, mma.sync) was not reached by every "
                          "lane of warp " + std::to_string(w) + ":" + describe_states(b);
                return;
            }
            for (int l = 0; l < b.warps[w]->size; ++l) lanes[l].state = State::Runnable;
            released = true;
        }
        if (released) continue;
        int live = 0, at_barrier = 0;
        for (const Thread& t : b.threads) {
            live += t.state != State::Done;
            at_barrier += t.state == State::AtBlockBarrier;
        }
        if (live == 0) return;
        if (at_barrier != live) {
            b.error = "deadlock:" + describe_states(b);
            return;
        }
        for (Thread& t : b.threads)
            if (t.state == State::AtBlockBarrier) t.state = State::Runnable;
    }
}

// ----------------------------------------------------------------------------- OS threads
#else

[[noreturn]] void fail(const std::string& message) {
    std::fprintf(stderr, "cuda_sim: %s\n", message.c_str());
    std::abort();
}

void block_barrier() {
    Block& b = *g_block;
    std::unique_lock<std::mutex> lock(b.mutex);
    const unsigned generation = b.generation;
    if (++b.arrived == b.live) {
        b.arrived = 0;
        ++b.generation;
        b.cv.notify_all();
    } else {
        b.cv.wait(lock, [&] { return b.generation != generation; });
    }
}

void warp_barrier() {
    Warp& w = *g_block->warps[t_current->warp];
    std::unique_lock<std::mutex> lock(w.mutex);
    if (w.live != w.size) fail("a warp collective was reached after a lane of its warp exited");
    const unsigned generation = w.generation;
    if (++w.arrived == w.size) {
        w.arrived = 0;
        ++w.generation;
        w.cv.notify_all();
    } else {
        w.cv.wait(lock, [&] { return w.generation != generation; });
    }
}

void thread_exit() {
    Block& b = *g_block;
    Warp& w = *b.warps[t_current->warp];
    {
        std::lock_guard<std::mutex> lock(w.mutex);
        if (w.arrived > 0) fail("a lane exited while its warp waits in a warp collective");
        --w.live;
    }
    std::lock_guard<std::mutex> lock(b.mutex);
    --b.live;  // exited threads count as arrived at later __syncthreads
    if (b.arrived > 0 && b.arrived == b.live) {
        b.arrived = 0;
        ++b.generation;
        b.cv.notify_all();
    }
}

void run_block(Block& b) {
    std::vector<std::thread> threads;
    threads.reserve(b.threads.size());
    for (Thread& t : b.threads)
        threads.emplace_back([&b, &t] {
            t_current = &t;
            b.body(b.launch);
            thread_exit();
        });
    for (std::thread& t : threads) t.join();
}
#endif

std::string check_launch(const char* kernel, dim3 grid, dim3 block, std::size_t smem, const void* id) {
    const std::string k = std::string(kernel) + ": ";
    const long threads = long(block.x) * block.y * block.z;
    if (threads < 1 || threads > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > 64)
        return k + "invalid block size (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
               std::to_string(block.z) + "): at most 1024 threads, (1024, 1024, 64) per dimension";
    if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
        return k + "invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
               std::to_string(grid.z) + ")";
    if (smem > kDefaultDynamicSmem) {
        const auto it = g_max_dynamic_smem.find(id);
        const long opted = it == g_max_dynamic_smem.end() ? 0 : it->second;
        if (long(smem) > opted)
            return k + std::to_string(smem) + " bytes of dynamic shared memory need cudaFuncSetAttribute("
                       "cudaFuncAttributeMaxDynamicSharedMemorySize) first (opted in: " + std::to_string(opted) + ")";
    }
    return "";
}

}  // namespace

Thread& current_thread() {
    if (t_current == nullptr) throw std::logic_error("cuda_sim: device code called outside a kernel launch");
    return *t_current;
}

const dim3& thread_idx() { return current_thread().idx; }
unsigned char* dynamic_smem() { return g_dynamic_smem; }
int lane_id() { return current_thread().lane; }

std::string run_grid(const char* kernel, dim3 grid, dim3 block, std::size_t smem, const void* kernel_id,
                     Body body, void* launch) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    std::string error = check_launch(kernel, grid, block, smem, kernel_id);
    if (!error.empty()) return error;
    const int n = int(block.x * block.y * block.z), n_warps = (n + kWarpSize - 1) / kWarpSize;
    std::unique_ptr<unsigned char[]> smem_buffer(smem > 0 ? new unsigned char[smem] : nullptr);
    g_dynamic_smem = smem_buffer.get();
    grid_dim = grid;
    block_dim = block;
    for (unsigned z = 0; z < grid.z && error.empty(); ++z)
        for (unsigned y = 0; y < grid.y && error.empty(); ++y)
            for (unsigned x = 0; x < grid.x && error.empty(); ++x) {
                block_idx = dim3(x, y, z);
                if (smem > 0) std::memset(smem_buffer.get(), 0xff, smem);  // NaN in every float type
                Block b;
                b.body = body;
                b.launch = launch;
                b.threads.resize(n);
                b.live = n;
                for (int w = 0; w < n_warps; ++w) {
                    b.warps.push_back(std::make_unique<Warp>());
                    b.warps.back()->size = b.warps.back()->live = std::min(kWarpSize, n - w * kWarpSize);
                }
                for (int i = 0; i < n; ++i) {
                    Thread& t = b.threads[i];
                    t.idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
                    t.lane = i % kWarpSize;
                    t.warp = i / kWarpSize;
                }
                g_block = &b;
                run_block(b);
                g_block = nullptr;
                if (!b.error.empty())
                    error = std::string(kernel) + ", block (" + std::to_string(x) + ", " + std::to_string(y) +
                            ", " + std::to_string(z) + "): " + b.error;
            }
    g_dynamic_smem = nullptr;
    return error;
}

void record_launch_error(const std::string& message) {
    g_last_error = cudaErrorLaunchFailure;
    g_last_message = message;
}

}  // namespace sim
}  // namespace nanolm

cudaError_t cudaFuncSetAttribute(const void* kernel_id, cudaFuncAttribute attr, int bytes) {
    using namespace nanolm::sim;
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
    if (bytes < 0 || bytes > kMaxDynamicSmemOptIn) {
        record_launch_error("cudaFuncSetAttribute: " + std::to_string(bytes) +
                            " bytes of dynamic shared memory exceed the opt-in limit of " +
                            std::to_string(kMaxDynamicSmemOptIn));
        return cudaErrorInvalidValue;
    }
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    g_max_dynamic_smem[kernel_id] = bytes;
    return cudaSuccess;
}

namespace nanolm {
namespace sim {

// ----------------------------------------------------------------------------- sync, warps

void syncthreads() { block_barrier(); }

const unsigned char* warp_exchange(const void* mine, std::size_t bytes) {
    Thread& t = current_thread();
    Warp& w = *g_block->warps[t.warp];
    const int p = t.parity;
    std::memcpy(w.slots[p][t.lane], mine, bytes);
    warp_barrier();
    t.parity ^= 1;
    return &w.slots[p][0][0];
}

void require_full_mask(unsigned mask, const char* what) {
    Thread& t = current_thread();
    const int size = g_block->warps[t.warp]->size;
    const unsigned full = size == kWarpSize ? 0xffffffffu : (1u << size) - 1;
    if (mask != full) fail(std::string(what) + ": only full-warp masks are emulated");
}

// ----------------------------------------------------------------------------- PTX twins

void cp_async(void* dst, const void* src, int bytes, bool valid) {
    volatile unsigned char* d = static_cast<unsigned char*>(dst);  // volatile: the compiler may not
    for (int i = 0; i < bytes; ++i) d[i] = 0xff;                    // fold it into a store TSan misses
    current_thread().copies.push_back({static_cast<unsigned char*>(dst),
                                       static_cast<const unsigned char*>(src), bytes, valid});
}

void cp_async_commit() {
    Thread& t = current_thread();
    t.group_ends.push_back(t.copies.size());
}

void cp_async_wait(int pending_groups) {
    Thread& t = current_thread();
    const int groups = int(t.group_ends.size());
    if (groups <= pending_groups) return;
    const std::size_t retired = t.group_ends[groups - pending_groups - 1];
    for (std::size_t i = 0; i < retired; ++i) {
        const Copy& c = t.copies[i];
        if (c.valid) std::memcpy(c.dst, c.src, c.bytes);
        else std::memset(c.dst, 0, c.bytes);
    }
    t.copies.erase(t.copies.begin(), t.copies.begin() + retired);
    t.group_ends.erase(t.group_ends.begin(), t.group_ends.begin() + (groups - pending_groups));
    for (std::size_t& end : t.group_ends) end -= retired;
}

namespace {
std::uint16_t half_at(const void* row, int element) {
    std::uint16_t v;
    std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * element, 2);
    return v;
}
}  // namespace

void ldmatrix_x4(std::uint32_t (&r)[4], const void* row_address, bool trans) {
    const unsigned char* all = warp_exchange(&row_address, sizeof(row_address));
    auto row = [&](int l) {
        const void* p;
        std::memcpy(&p, all + 32 * l, sizeof(p));
        return p;
    };
    const int lane = lane_id(), g = lane / 4, q = lane % 4;
    for (int i = 0; i < 4; ++i) {
        std::uint16_t lo, hi;
        if (!trans) {
            lo = half_at(row(8 * i + g), 2 * q);
            hi = half_at(row(8 * i + g), 2 * q + 1);
        } else {
            lo = half_at(row(8 * i + 2 * q), g);
            hi = half_at(row(8 * i + 2 * q + 1), g);
        }
        r[i] = std::uint32_t(lo) | (std::uint32_t(hi) << 16);
    }
}

namespace {
float to_float(std::uint16_t bits, bool bf16) {
    if (bf16) {
        const std::uint32_t f = std::uint32_t(bits) << 16;
        float out;
        std::memcpy(&out, &f, 4);
        return out;
    }
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
}
}  // namespace

void mma_m16n8k16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1, bool bf16) {
    const std::uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    const unsigned char* all = warp_exchange(mine, sizeof(mine));
    auto element = [&](int lane, int reg, int half) {
        std::uint32_t word;
        std::memcpy(&word, all + 32 * lane + 4 * reg, 4);
        return to_float(std::uint16_t(word >> (16 * half)), bf16);
    };
    // A (16 x 16): a[row / 8 + 2 (k / 8)] of lane (row % 8) * 4 + (k % 8) / 2, half k % 2.
    // B (16 x 8): b[k / 8] (registers 4, 5) of lane n * 4 + (k % 8) / 2, half k % 2.
    const int lane = lane_id(), g = lane / 4, q = lane % 4;
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * q + (e & 1);
        float acc = c[e];
        for (int k = 0; k < 16; ++k) {
            const float x = element((row % 8) * 4 + (k % 8) / 2, row / 8 + 2 * (k / 8), k % 2);
            const float y = element(col * 4 + (k % 8) / 2, 4 + k / 8, k % 2);
            acc = std::fma(x, y, acc);
        }
        c[e] = acc;
    }
}

}  // namespace sim
}  // namespace nanolm

// ----------------------------------------------------------------------------- runtime API

cudaError_t cudaGetLastError() {
    const cudaError_t e = nanolm::sim::g_last_error;
    nanolm::sim::g_last_error = cudaSuccess;
    return e;
}

const char* cudaGetErrorString(cudaError_t error) {
    return error == cudaSuccess ? "no error" : nanolm::sim::g_last_message.c_str();
}

cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
    if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
    *value = nanolm::sim::kSimulatedSMs;
    return cudaSuccess;
}
