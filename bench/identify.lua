-- wrk script: POST one photo to /v1/identify as multipart, and count the
-- answers by status. The photo's path comes from the environment variable
-- FLUKEID_PHOTO.
local path = os.getenv("FLUKEID_PHOTO")
local file = assert(io.open(path, "rb"))
local photo = file:read("*a")
file:close()

local boundary = "flukeidwrkboundary"
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.body = "--" .. boundary .. "\r\n"
  .. "Content-Disposition: form-data; name=\"image\"; filename=\"photo.jpg\"\r\n"
  .. "Content-Type: application/octet-stream\r\n\r\n"
  .. photo .. "\r\n--" .. boundary .. "--\r\n"

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  statuses = {}
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for status, count in pairs(s) do
      total[status] = (total[status] or 0) + count
    end
  end
  for status, count in pairs(total) do
    io.write(string.format("status %d: %d\n", status, count))
  end
  for _, p in ipairs({50, 90, 99}) do
    io.write(string.format("latency p%d: %.1f ms\n", p, latency:percentile(p) / 1000))
  end
end
