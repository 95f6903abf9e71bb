#pragma once
// Stop strings over streamed text: text is pushed piece by piece; what is certainly before any stop string comes
// out at once, a tail that could still become the start of a stop string is held back, and the first complete stop
// string ends the stream (it and everything after it are dropped, as the OpenAI API does).
#include <string>
#include <vector>

namespace mamba3::server {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops = {});
  // Appends `piece`; returns the text that may be emitted now. After a stop string was found, stopped() is true
  // and further pushes return nothing.
  std::string push(const std::string& piece);
  // The held-back tail (the stream ended without a stop string).
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace mamba3::server
