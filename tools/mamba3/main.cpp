// mamba3: the command-line entry point. Errors print `error: …` and exit non-zero.
#include <cstdio>
#include <exception>

#include "commands.h"
#include "core/error.h"
#include "core/heap_retention.h"
#include "ops/blas_kernels.h"

int main(int argc, char** argv) {
  mamba3::reexec_with_blas_core(argv);  // OpenBLAS's own kernel choice is stale on some newer CPUs (ops/blas_kernels.h)
  mamba3::retain_freed_heap_memory();   // activations freed and allocated again every step: no fresh page faults
  CLI::App app{"mamba3: a C++ engine for Mamba-3 state space models"};
  app.require_subcommand(1);
  mamba3::cli::register_generate(app);
  mamba3::cli::register_info(app);
  mamba3::cli::register_bench(app);
  mamba3::cli::register_tokenize(app);
  mamba3::cli::register_prepare(app);
  mamba3::cli::register_train(app);
  mamba3::cli::register_task(app);
  mamba3::cli::register_eval(app);
#ifdef MAMBA3_HAVE_SERVER
  mamba3::cli::register_serve(app);
#endif
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const mamba3::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
