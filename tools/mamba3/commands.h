#pragma once
// Every subcommand adds itself to the app through one of these.
#include <CLI/CLI.hpp>

namespace mamba3::cli {

void register_info(CLI::App& app);
void register_tokenize(CLI::App& app);
void register_generate(CLI::App& app);
void register_bench(CLI::App& app);
void register_serve(CLI::App& app);
void register_prepare(CLI::App& app);
void register_train(CLI::App& app);
void register_task(CLI::App& app);
void register_eval(CLI::App& app);

}  // namespace mamba3::cli
