// The native gRPC front end: gRPC's C++ core accepts calls and moves bytes; Python decides what they mean.
//
// Every method is served through one generic asynchronous service, so this file knows no protocol: for each call
// it reports events to one Python callback (start, each request message, half-close, done) and takes writes and
// the final status from Python through ttaserve_frontend_write / ttaserve_frontend_finish. A small pool of threads
// polls one completion queue; a unary call's request is handed to Python on the polling thread that read it, so
// the request is parsed, run and answered with no thread hand-off in between (the Python gRPC server hands each
// call from its poller to an executor thread, and spends ~0.4 ms of CPU per call on a 2-core machine).
//
// A call is named to Python by a 64-bit id, never a pointer: Python may answer a call that has just been
// cancelled and freed, and then gets -1 back instead of touching freed memory.
//
// Of the pool's threads, at most two wait in the completion queue at once; the rest wait idle, newest on top. A
// thread that takes an event leaves polling and, when no other poller is left, wakes the newest idle thread to take
// its place, so a handler that blocks (a batch follower, a long adaptation step) never leaves calls unread; once
// its handler returns it polls again, or goes idle when two others already poll. (gRPC's own synchronous server
// keeps between one and two pollers the same way.) Keeping the handlers on the same few threads matters: with all
// sixteen threads polling, a batch-1 handler ran 0.12-0.18 ms slower than with two (measured; cold caches and
// per-thread malloc arenas are the likely cause, not a proven one).
//
// Two things keep a unary call cheap. Methods that Python declares unary (ttaserve_frontend_add_unary_method) get
// one event, kUnary, with the start record and the request together, and no done event. And each polling thread
// holds a Python thread state for its whole life (through the PyGILState/PyEval functions Python passes in), so a
// callback only takes the GIL: a thread without one would create and destroy a thread state per callback (~8 us).

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace {

enum Event { kStart = 0, kMessage = 1, kHalfClose = 2, kDone = 3, kUnary = 4 };
// What the start callback returns: read one request (unary), read until half-close (streaming), or nothing
// (Python has already finished the call, e.g. an unknown method).
enum Reading { kReadOne = 0, kReadAll = 1, kReadNone = -1 };

typedef int (*EventCallback)(uint64_t call, int event, const char* data, size_t length);

// CPython's PyGILState_Ensure, PyEval_SaveThread, PyEval_RestoreThread and PyGILState_Release, as addresses.
struct PythonThreadApi {
  int (*ensure)();
  void* (*save)();
  void (*restore)(void*);
  void (*release)(int);
};

class Frontend;

enum class Op { kRequest, kRead, kWrite, kFinish, kDone };

struct Call;

// A pool thread waiting for its turn to poll.
struct IdleThread {
  std::condition_variable wake;
  bool woken = false;
};

// Threads that may wait in the completion queue at once, and the fewest a thread taking an event may leave there.
constexpr int kMaxPollers = 2;
constexpr int kMinPollers = 1;

struct Tag {
  Call* call;
  Op op;
};

struct Call {
  explicit Call(uint64_t call_id) : id(call_id), stream(&context) {}
  uint64_t id;
  grpc::GenericServerContext context;
  grpc::GenericServerAsyncReaderWriter stream;
  grpc::ByteBuffer incoming;
  Tag request_tag{this, Op::kRequest}, read_tag{this, Op::kRead}, write_tag{this, Op::kWrite};
  Tag finish_tag{this, Op::kFinish}, done_tag{this, Op::kDone};

  std::mutex mutex;  // guards everything below
  int reading = kReadOne;
  bool unary = false;
  bool done = false, finishing = false, write_in_flight = false, finish_queued = false;
  int ops_pending = 0;  // operations handed to gRPC whose tag has not come back, and holds taken by Pin
  std::deque<grpc::ByteBuffer> writes;
  grpc::ByteBuffer outgoing;
  grpc::Status final_status;
  bool final_has_message = false;
  grpc::ByteBuffer final_message;
};

grpc::ByteBuffer ToBuffer(const char* data, size_t length) {
  grpc::Slice slice(data, length);
  return grpc::ByteBuffer(&slice, 1);
}

void PutField(std::string* out, const std::string& value) {
  uint32_t length = static_cast<uint32_t>(value.size());
  out->append(reinterpret_cast<const char*>(&length), sizeof(length));
  out->append(value);
}

class Frontend {
 public:
  Frontend(EventCallback callback, PythonThreadApi python, int max_receive, int max_send)
      : callback_(callback), python_(python), max_receive_(max_receive), max_send_(max_send) {}

  void AddUnaryMethod(const char* method) { unary_methods_.insert(method); }

  int AddPort(const char* address) { return Listen(address, grpc::InsecureServerCredentials()); }

  // A TLS port serving the key and certificate chain at these paths, re-read every refresh_s seconds so that a
  // rotated certificate is served without a restart; with client_ca_path (not null), clients must present a
  // certificate that bundle signed, and every start record carries the verified certificate's auth properties.
  int AddSecurePort(const char* address, const char* key_path, const char* cert_path, const char* client_ca_path,
                    unsigned int refresh_s) {
    auto files = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
        key_path, cert_path, client_ca_path == nullptr ? "" : client_ca_path, refresh_s);
    grpc::experimental::TlsServerCredentialsOptions options(files);
    options.watch_identity_key_cert_pairs();
    if (client_ca_path == nullptr) {
      options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    } else {
      options.watch_root_certs();
      options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
      authenticated_ = true;
    }
    return Listen(address, grpc::experimental::TlsServerCredentials(options));
  }

  int Port(int index) const { return ports_.at(index); }

  bool Start(int threads) {
    builder_.SetMaxReceiveMessageSize(max_receive_);
    builder_.SetMaxSendMessageSize(max_send_);
    builder_.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    builder_.RegisterAsyncGenericService(&service_);
    queue_ = builder_.AddCompletionQueue();
    server_ = builder_.BuildAndStart();
    if (!server_) return false;
    for (int i = 0; i < threads; ++i) RequestCall();
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Poll(); });
    return true;
  }

  // Stop taking calls; cancel those still running after grace_s; wait for the pollers.
  void Shutdown(double grace_s) {
    if (shut_down_.exchange(true)) return;
    if (server_) {
      auto grace = std::chrono::microseconds(static_cast<int64_t>(grace_s * 1e6));
      server_->Shutdown(std::chrono::system_clock::now() + grace);
    }
    if (queue_) {
      queue_->Shutdown();
      WakeAllIdle();
      if (threads_.empty()) {  // never started: drain the queue here, as gRPC requires before destroying it
        void* tag;
        bool ok;
        while (queue_->Next(&tag, &ok)) {
        }
      }
    }
    for (auto& thread : threads_) thread.join();
    threads_.clear();
  }

  // Whether the call still runs: false once it finished, or the client cancelled it, its deadline passed or its
  // connection closed (the done tag came back). Asks the table only, so a freed call is never touched.
  bool Active(uint64_t id) {
    std::lock_guard<std::mutex> lock(calls_mutex_);
    return calls_.count(id) != 0;
  }

  int Write(uint64_t id, const char* data, size_t length) {
    Call* call = Pin(id);
    if (call == nullptr) return -1;
    int result = -1;
    {
      std::lock_guard<std::mutex> lock(call->mutex);
      if (!call->done && !call->finish_queued) {
        call->writes.push_back(ToBuffer(data, length));
        PumpLocked(call);
        result = 0;
      }
    }
    Release(call);
    return result;
  }

  int Finish(uint64_t id, int code, const char* details, const char* data, size_t length, int has_message) {
    Call* call = Pin(id);
    if (call == nullptr) return -1;
    int result = -1;
    {
      std::lock_guard<std::mutex> lock(call->mutex);
      if (!call->done && !call->finish_queued) {
        call->finish_queued = true;
        call->final_status = grpc::Status(static_cast<grpc::StatusCode>(code), details);
        call->final_has_message = has_message != 0;
        if (has_message) call->final_message = ToBuffer(data, length);
        PumpLocked(call);
        result = 0;
      }
    }
    Release(call);
    return result;
  }

 private:
  int Listen(const char* address, std::shared_ptr<grpc::ServerCredentials> credentials) {
    ports_.push_back(0);
    builder_.AddListeningPort(address, credentials, &ports_.back());
    return static_cast<int>(ports_.size()) - 1;
  }

  // The call with this id, held alive until the caller's Release: the hold is taken under the table's lock, so a
  // done tag that arrives meanwhile (it takes the call out of the table first) cannot free the call underneath.
  Call* Pin(uint64_t id) {
    std::lock_guard<std::mutex> table_lock(calls_mutex_);
    auto found = calls_.find(id);
    if (found == calls_.end()) return nullptr;
    Call* call = found->second;
    std::lock_guard<std::mutex> call_lock(call->mutex);
    ++call->ops_pending;
    return call;
  }

  void RequestCall() {
    Call* call = new Call(next_id_.fetch_add(1) + 1);
    call->context.AsyncNotifyWhenDone(&call->done_tag);
    service_.RequestCall(&call->context, &call->stream, queue_.get(), queue_.get(), &call->request_tag);
  }

  // Issue the next write, or the finish once every queued write has gone out. Holds call->mutex.
  void PumpLocked(Call* call) {
    if (call->write_in_flight || call->finishing || call->done) return;
    if (!call->writes.empty()) {
      call->outgoing = std::move(call->writes.front());
      call->writes.pop_front();
      call->write_in_flight = true;
      ++call->ops_pending;
      call->stream.Write(call->outgoing, &call->write_tag);
    } else if (call->finish_queued) {
      call->finishing = true;
      ++call->ops_pending;
      if (call->final_has_message) {
        call->stream.WriteAndFinish(call->final_message, grpc::WriteOptions(), call->final_status, &call->finish_tag);
      } else {
        call->stream.Finish(call->final_status, &call->finish_tag);
      }
    }
  }

  void Emit(Call* call, Event event, const char* data, size_t length) { callback_(call->id, event, data, length); }

  // The request of a declared unary method, with its start record in front (a 4-byte length, then the record):
  // the request's slices are copied once, straight behind the record.
  void EmitUnary(Call* call, const std::vector<grpc::Slice>& slices) {
    std::string record = StartRecord(call);
    size_t length = 0;
    for (const auto& slice : slices) length += slice.size();
    std::string event;
    event.reserve(4 + record.size() + length);
    PutField(&event, record);
    for (const auto& slice : slices) event.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    callback_(call->id, kUnary, event.data(), event.size());
  }

  std::string StartRecord(Call* call) {
    std::string record;
    double remaining = -1.0;  // no deadline
    auto deadline = call->context.deadline();
    if (deadline != std::chrono::system_clock::time_point::max()) {
      remaining = std::chrono::duration<double>(deadline - std::chrono::system_clock::now()).count();
      if (remaining < 0) remaining = 0;
    }
    record.append(reinterpret_cast<const char*>(&remaining), sizeof(remaining));
    PutField(&record, call->context.method());
    PutField(&record, call->context.peer());
    std::string properties;  // the client certificate's auth properties, as name/value fields (mutual TLS only)
    if (authenticated_) {
      auto auth = call->context.auth_context();
      for (auto property = auth->begin(); property != auth->end(); ++property) {
        PutField(&properties, std::string((*property).first.data(), (*property).first.size()));
        PutField(&properties, std::string((*property).second.data(), (*property).second.size()));
      }
    }
    PutField(&record, properties);
    for (const auto& entry : call->context.client_metadata()) {
      PutField(&record, std::string(entry.first.data(), entry.first.size()));
      PutField(&record, std::string(entry.second.data(), entry.second.size()));
    }
    return record;
  }

  void Read(Call* call) {
    std::lock_guard<std::mutex> lock(call->mutex);
    if (call->done || call->finish_queued) return;
    ++call->ops_pending;
    call->stream.Read(&call->incoming, &call->read_tag);
  }

  void OnRequest(Call* call, bool ok) {
    if (!ok) {  // shutting down: the call never started, so no done tag will come
      delete call;
      return;
    }
    if (!shut_down_) RequestCall();
    {
      std::lock_guard<std::mutex> lock(call->mutex);
      ++call->ops_pending;  // the done tag, counted before the call can be found (and pinned) in the table
    }
    {
      std::lock_guard<std::mutex> lock(calls_mutex_);
      calls_[call->id] = call;
    }
    if (unary_methods_.count(call->context.method()) != 0) {
      call->unary = true;
      Read(call);
      return;
    }
    std::string record = StartRecord(call);
    int reading = callback_(call->id, kStart, record.data(), record.size());
    call->reading = reading;
    if (reading != kReadNone) Read(call);
  }

  void OnRead(Call* call, bool ok) {
    bool done;
    {
      std::lock_guard<std::mutex> lock(call->mutex);
      done = call->done;
    }
    // A read that completes after the call was cancelled is dropped: Python has been told the call is done.
    if (!done && !ok && call->unary) {
      Finish(call->id, grpc::StatusCode::INTERNAL, "the client sent no request", nullptr, 0, 0);
    } else if (!done && !ok) {
      Emit(call, kHalfClose, nullptr, 0);
    }
    if (!done && ok) {
      std::vector<grpc::Slice> slices;
      if (!call->incoming.Dump(&slices).ok()) slices.clear();
      if (call->unary) {
        EmitUnary(call, slices);
      } else if (slices.size() == 1) {
        Emit(call, kMessage, reinterpret_cast<const char*>(slices[0].begin()), slices[0].size());
      } else {
        std::string joined;
        for (const auto& slice : slices) joined.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
        Emit(call, kMessage, joined.data(), joined.size());
      }
      call->incoming.Clear();
      if (call->reading == kReadAll) Read(call);
    }
    Release(call);
  }

  void OnDone(Call* call) {
    {
      std::lock_guard<std::mutex> lock(calls_mutex_);
      calls_.erase(call->id);
    }
    {
      std::lock_guard<std::mutex> lock(call->mutex);
      call->done = true;
    }
    char cancelled = call->context.IsCancelled() ? 1 : 0;
    if (!call->unary) Emit(call, kDone, &cancelled, 1);
    Release(call);
  }

  // One operation's tag came back, or a Pin's hold ended: free the call once nothing is pending and it is done.
  void Release(Call* call) {
    bool free_it;
    {
      std::lock_guard<std::mutex> lock(call->mutex);
      free_it = --call->ops_pending == 0 && call->done;
    }
    if (free_it) delete call;
  }

  // Wait for a turn to poll: at once while fewer than kMaxPollers poll (or the queue is shutting down), else idle
  // until a thread leaving the queue wakes this one (having counted it as a poller).
  void EnterPolling(IdleThread* self) {
    std::unique_lock<std::mutex> lock(pool_mutex_);
    if (stopping_ || pollers_ < kMaxPollers) {
      ++pollers_;
      return;
    }
    self->woken = false;
    idle_.push_back(self);
    self->wake.wait(lock, [self] { return self->woken; });
  }

  // A poller took an event: hand polling to the newest idle thread if too few pollers would be left.
  void LeavePolling() {
    std::lock_guard<std::mutex> lock(pool_mutex_);
    --pollers_;
    if (pollers_ < kMinPollers && !idle_.empty()) WakeNewestLocked();
  }

  void WakeAllIdle() {
    std::lock_guard<std::mutex> lock(pool_mutex_);
    stopping_ = true;
    while (!idle_.empty()) WakeNewestLocked();
  }

  // Wake the thread that went idle last, as a poller. Holds pool_mutex_.
  void WakeNewestLocked() {
    IdleThread* thread = idle_.back();
    idle_.pop_back();
    ++pollers_;
    thread->woken = true;
    thread->wake.notify_one();
  }

  void Poll() {
    int gil_state = python_.ensure();
    void* thread_state = python_.save();  // keep the thread state, give the GIL back
    IdleThread self;
    void* raw_tag;
    bool ok;
    for (EnterPolling(&self); queue_->Next(&raw_tag, &ok); EnterPolling(&self)) {
      LeavePolling();
      Tag* tag = static_cast<Tag*>(raw_tag);
      Call* call = tag->call;
      switch (tag->op) {
        case Op::kRequest:
          OnRequest(call, ok);
          break;
        case Op::kRead:
          OnRead(call, ok);
          break;
        case Op::kWrite: {
          {
            std::lock_guard<std::mutex> lock(call->mutex);
            call->write_in_flight = false;
            if (ok) {
              PumpLocked(call);
            } else {
              call->writes.clear();  // the client is gone; the done tag follows
            }
          }
          Release(call);
          break;
        }
        case Op::kFinish:
          Release(call);
          break;
        case Op::kDone:
          OnDone(call);
          break;
      }
    }
    LeavePolling();
    python_.restore(thread_state);
    python_.release(gil_state);
  }

  EventCallback callback_;
  PythonThreadApi python_;
  int max_receive_, max_send_;
  bool authenticated_ = false;  // a port requires client certificates: start records carry their properties
  std::unordered_set<std::string> unary_methods_;
  grpc::ServerBuilder builder_;
  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::ServerCompletionQueue> queue_;
  std::unique_ptr<grpc::Server> server_;
  std::deque<int> ports_;  // stable addresses: the builder writes each bound port at start
  std::vector<std::thread> threads_;
  std::mutex pool_mutex_;  // guards the three below
  int pollers_ = 0;  // threads in, or on their way into, queue_->Next
  std::vector<IdleThread*> idle_;  // waiting for a turn to poll; the newest last
  bool stopping_ = false;
  std::atomic<uint64_t> next_id_{0};
  std::atomic<bool> shut_down_{false};
  std::mutex calls_mutex_;
  std::unordered_map<uint64_t, Call*> calls_;
};

}  // namespace

extern "C" {

void* ttaserve_frontend_create(EventCallback callback, int (*ensure)(), void* (*save)(), void (*restore)(void*),
                               void (*release)(int), int max_receive, int max_send) {
  return new Frontend(callback, PythonThreadApi{ensure, save, restore, release}, max_receive, max_send);
}

void ttaserve_frontend_add_unary_method(void* frontend, const char* method) {
  static_cast<Frontend*>(frontend)->AddUnaryMethod(method);
}

int ttaserve_frontend_add_port(void* frontend, const char* address) {
  return static_cast<Frontend*>(frontend)->AddPort(address);
}

int ttaserve_frontend_add_secure_port(void* frontend, const char* address, const char* key_path,
                                      const char* cert_path, const char* client_ca_path, unsigned int refresh_s) {
  return static_cast<Frontend*>(frontend)->AddSecurePort(address, key_path, cert_path, client_ca_path, refresh_s);
}

int ttaserve_frontend_port(void* frontend, int index) { return static_cast<Frontend*>(frontend)->Port(index); }

int ttaserve_frontend_start(void* frontend, int threads) {
  return static_cast<Frontend*>(frontend)->Start(threads) ? 0 : -1;
}

int ttaserve_frontend_active(void* frontend, uint64_t call) {
  return static_cast<Frontend*>(frontend)->Active(call) ? 1 : 0;
}

int ttaserve_frontend_write(void* frontend, uint64_t call, const char* data, size_t length) {
  return static_cast<Frontend*>(frontend)->Write(call, data, length);
}

int ttaserve_frontend_finish(void* frontend, uint64_t call, int code, const char* details, const char* data,
                             size_t length, int has_message) {
  return static_cast<Frontend*>(frontend)->Finish(call, code, details, data, length, has_message);
}

void ttaserve_frontend_shutdown(void* frontend, double grace_s) {
  static_cast<Frontend*>(frontend)->Shutdown(grace_s);
}

void ttaserve_frontend_destroy(void* frontend) { delete static_cast<Frontend*>(frontend); }

}  // extern "C"
