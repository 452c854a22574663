// Calibration documents: a text file is one document; .jsonl records are {"text"} documents or
// supervised {"prompt", "response"} examples taken whole; anything else is one error naming the line.
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "core/error.h"
#include "io/dataset.h"
#include "support/temp_dir.h"

namespace mopt::io {
namespace {

std::string write(const testing::TempDir& dir, const std::string& name, const std::string& text) {
  std::ofstream(dir.file(name), std::ios::binary) << text;
  return dir.file(name);
}

TEST(Dataset, TextJsonlAndSupervisedRecords) {
  testing::TempDir dir;
  EXPECT_EQ(read_documents(write(dir, "a.txt", "one\ntwo\n")), std::vector<std::string>{"one\ntwo\n"});
  const auto docs = read_documents(write(dir, "b.jsonl", "{\"text\": \"first\"}\n{\"prompt\": \"Say: \", \"response\": \"amen\"}\n{\"text\": \"\"}\n"));
  EXPECT_EQ(docs, (std::vector<std::string>{"first", "Say: amen"}));
  try {
    read_documents(write(dir, "c.jsonl", "{\"text\": \"ok\"}\n{\"prompt\": \"only a prompt\"}\n"));
    FAIL() << "a record without a response was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("c.jsonl:2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(read_documents(write(dir, "d.jsonl", "{\"text\": \"\"}\n")), Error);
  EXPECT_THROW(read_documents(write(dir, "e.txt", " \n\t")), Error);
}

}  // namespace
}  // namespace mopt::io
