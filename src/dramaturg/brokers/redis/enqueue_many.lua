-- Enqueues many messages as Dramatiq's dispatch script enqueues one: the body in
-- <ns>:<queue>.msgs, the id at the tail of <ns>:<queue>. The messages of a queue come as
-- one argument of netstrings ("<length>:<bytes>"), Redis id then body for each: one
-- argument per message costs the client more to pack than building the message.
-- KEYS: namespace; ARGV: (queue name, framed ids and bodies) per queue.
local count = 0
for a = 1, #ARGV, 2 do
    local queue = KEYS[1] .. ":" .. ARGV[a]
    local blob = ARGV[a + 1]
    local pos, size = 1, #blob
    local fields, ids = {}, {}
    while pos <= size do
        local colon = string.find(blob, ":", pos, true)
        local stop = colon + tonumber(string.sub(blob, pos, colon - 1))
        local id = string.sub(blob, colon + 1, stop)
        colon = string.find(blob, ":", stop + 1, true)
        pos = colon + tonumber(string.sub(blob, stop + 1, colon - 1)) + 1
        fields[#fields + 1] = id
        fields[#fields + 1] = string.sub(blob, colon + 1, pos - 1)
        ids[#ids + 1] = id
        if #ids == 500 or pos > size then
            redis.call("hset", queue .. ".msgs", unpack(fields))
            redis.call("rpush", queue, unpack(ids))
            count = count + #ids
            fields, ids = {}, {}
        end
    end
end
return count
