//+------------------------------------------------------------------+
//| TcProtocol.mqh - the bridge protocol (schemas/bridge.py) in MQL  |
//|                                                                  |
//| Frames are one JSON object per ZeroMQ message, tagged by "t".    |
//| Every frame carries "seq" (per sender and session, from 1, +1 per|
//| frame) and "ts" (UTC ns when it left). Here:                     |
//|   - CTcOutbox: the no-drop outbound FIFO (frames wait here while |
//|     libzmq says EAGAIN and are retried on the next tick/loop);   |
//|   - TcFrame: stamps t/seq/ts onto a stored "tail";               |
//|   - CTcStateHash: the canonical state string + SHA-256;          |
//|   - CTcStrMap: string -> int hash map (MQL4 has no Generic lib); |
//|   - time conversions, role enum, comment helpers, owner lock.    |
//+------------------------------------------------------------------+
#ifndef TC_PROTOCOL_MQH
#define TC_PROTOCOL_MQH

#include <Tradecopy\TcZmq.mqh>
#include <Tradecopy\TcJson.mqh>

#define TC_PROTOCOL_VERSION 1
#define TC_EA_VERSION       "1.0.0"
//--- MetaTrader stores at most 31 characters of an order comment
#define TC_COMMENT_MAX      31

enum ENUM_TC_ROLE
  {
   TC_ROLE_MASTER   = 0,   // master: report trade events, refuse commands
   TC_ROLE_FOLLOWER = 1,   // follower: execute commands, report no events
   TC_ROLE_BOTH     = 2    // both: a copied account that is itself copied
  };

bool TcRoleReports(const ENUM_TC_ROLE role)  { return role == TC_ROLE_MASTER || role == TC_ROLE_BOTH; }
bool TcRoleExecutes(const ENUM_TC_ROLE role) { return role == TC_ROLE_FOLLOWER || role == TC_ROLE_BOTH; }

//+------------------------------------------------------------------+
//| A whole frame from its tag, sequence number, send time and tail. |
//+------------------------------------------------------------------+
string TcFrame(const string tag, const long seq, const long ts, const string tail)
  {
   string f = "{\"t\":\"" + tag + "\",\"seq\":" + IntegerToString(seq) + ",\"ts\":" + IntegerToString(ts);
   if(StringLen(tail) > 0)
     {
      StringAdd(f, ",");
      StringAdd(f, tail);
     }
   StringAdd(f, "}");
   return f;
  }
//+------------------------------------------------------------------+
//| The outbound FIFO.                                               |
//| Entries are (tag, tail); seq and ts are stamped only when libzmq |
//| accepts the frame, so a frame that waits keeps its place and gets|
//| the next sequence number whenever it finally leaves. Nothing is  |
//| ever dropped for being "full": the FIFO grows.                   |
//| On a new session, events and results are carried over (they are  |
//| facts the connector still needs); hb/account/snapshot/error are  |
//| stale and dropped (a fresh snapshot follows every welcome).      |
//| The same holds when the frames move to another program of the    |
//| account (EA <-> MT5 service handover): TakeCarried.              |
//+------------------------------------------------------------------+
//--- the one rule for which frames outlive their session or program: events and results are
//--- facts the connector still needs (a result answers its command once); the rest is stale
bool TcOutboxCarries(const string tag)
  {
   return tag == "event" || tag == "result";
  }

class CTcOutbox
  {
private:
   string            m_tag[];
   string            m_tail[];
   int               m_head;
   int               m_count;
   int               m_warnAt;

   void              Compact()
     {
      if(m_head == 0)
         return;
      for(int i = 0; i < m_count; i++)
        {
         m_tag[i] = m_tag[m_head + i];
         m_tail[i] = m_tail[m_head + i];
        }
      for(int j = m_count; j < m_count + m_head && j < ArraySize(m_tag); j++)
        {
         m_tag[j] = "";     // release the strings' memory
         m_tail[j] = "";
        }
      m_head = 0;
     }

public:
                     CTcOutbox() : m_head(0), m_count(0), m_warnAt(10000) {}

   int               Count() const { return m_count; }
   string            PeekTag() const { return m_tag[m_head]; }
   string            PeekTail() const { return m_tail[m_head]; }

   void              Push(const string tag, const string tail)
     {
      int need = m_head + m_count + 1;
      if(need > ArraySize(m_tag))
        {
         if(m_head > 0 && m_head >= m_count)
            Compact();
         need = m_head + m_count + 1;
         if(need > ArraySize(m_tag))
           {
            int cap = (int)MathMax(64, ArraySize(m_tag) * 2);
            ArrayResize(m_tag, cap);
            ArrayResize(m_tail, cap);
           }
        }
      m_tag[m_head + m_count] = tag;
      m_tail[m_head + m_count] = tail;
      m_count++;
      if(m_count >= m_warnAt)
        {
         PrintFormat("tradecopy: %d frames wait for the connector (nothing is dropped)", m_count);
         m_warnAt *= 2;
        }
     }

   void              Pop()
     {
      if(m_count == 0)
         return;
      m_tag[m_head] = "";
      m_tail[m_head] = "";
      m_head++;
      m_count--;
      if(m_count == 0)
        {
         m_head = 0;
         m_warnAt = 10000;
        }
     }

   //--- keep only the frames a new session must still deliver
   void              KeepForNewSession()
     {
      int w = 0;
      for(int i = 0; i < m_count; i++)
        {
         string tag = m_tag[m_head + i];
         if(TcOutboxCarries(tag))
           {
            m_tag[w] = tag;
            m_tail[w] = m_tail[m_head + i];
            w++;
           }
        }
      for(int j = w; j < m_head + m_count; j++)
        {
         m_tag[j] = "";
         m_tail[j] = "";
        }
      m_head = 0;
      m_count = w;
     }

   void              Clear()
     {
      ArrayResize(m_tag, 0);
      ArrayResize(m_tail, 0);
      m_head = 0;
      m_count = 0;
      m_warnAt = 10000;
     }

   //--- hand the frames that must survive (TcOutboxCarries) to another program, in order, and
   //--- empty the FIFO: an EA giving the socket to the MT5 service, or taking it back. Taking
   //--- only events dropped the results of commands the EA had run but not yet answered.
   int               TakeCarried(string &tags[], string &tails[])
     {
      int n = 0;
      ArrayResize(tags, m_count);
      ArrayResize(tails, m_count);
      for(int i = 0; i < m_count; i++)
         if(TcOutboxCarries(m_tag[m_head + i]))
           {
            tags[n] = m_tag[m_head + i];
            tails[n] = m_tail[m_head + i];
            n++;
           }
      ArrayResize(tags, n);
      ArrayResize(tails, n);
      Clear();
      return n;
     }

  };
//+------------------------------------------------------------------+
//| string -> int map, open addressing, FNV-1a over UTF-16 units.    |
//+------------------------------------------------------------------+
class CTcStrMap
  {
private:
   string            m_keys[];
   int               m_vals[];
   bool              m_used[];
   int               m_cap;
   int               m_size;

   uint              HashOf(const string key) const
     {
      uint h = 2166136261;
      int n = StringLen(key);
      for(int i = 0; i < n; i++)
        {
         h ^= (uint)StringGetCharacter(key, i);
         h *= 16777619;
        }
      return h;
     }
   void              Grow();

public:
                     CTcStrMap() : m_cap(0), m_size(0) { Init(256); }
   void              Init(const int cap)
     {
      m_cap = cap;
      m_size = 0;
      ArrayResize(m_keys, cap);
      ArrayResize(m_vals, cap);
      ArrayResize(m_used, cap);
      for(int i = 0; i < cap; i++)
        {
         m_keys[i] = "";
         m_vals[i] = 0;
         m_used[i] = false;
        }
     }
   int               Size() const { return m_size; }
   void              Set(const string key, const int val)
     {
      if((m_size + 1) * 10 > m_cap * 7)
         Grow();
      uint mask = (uint)m_cap - 1;   // m_cap is a power of two
      uint i = HashOf(key) & mask;
      while(m_used[i])
        {
         if(m_keys[i] == key)
           {
            m_vals[i] = val;
            return;
           }
         i = (i + 1) & mask;
        }
      m_used[i] = true;
      m_keys[i] = key;
      m_vals[i] = val;
      m_size++;
     }
   bool              Get(const string key, int &val) const
     {
      uint mask = (uint)m_cap - 1;
      uint i = HashOf(key) & mask;
      while(m_used[i])
        {
         if(m_keys[i] == key)
           {
            val = m_vals[i];
            return true;
           }
         i = (i + 1) & mask;
        }
      return false;
     }
  };
//--- doubles the table; defined out of class because it calls Set, which calls Grow
void CTcStrMap::Grow()
  {
   string oldk[];
   int oldv[];
   bool oldu[];
   int oldcap = m_cap;
   ArrayResize(oldk, oldcap);
   ArrayResize(oldv, oldcap);
   ArrayResize(oldu, oldcap);
   for(int i = 0; i < oldcap; i++)
     {
      oldk[i] = m_keys[i];
      oldv[i] = m_vals[i];
      oldu[i] = m_used[i];
     }
   Init(oldcap * 2);
   for(int j = 0; j < oldcap; j++)
      if(oldu[j])
         Set(oldk[j], oldv[j]);
  }
//+------------------------------------------------------------------+
//| SHA-256 of the UTF-8 bytes of text, lowercase hex.               |
//+------------------------------------------------------------------+
string TcSha256Hex(const string text)
  {
   uchar data[];
   uchar key[];
   uchar digest[];
   //--- CryptEncode may refuse empty input: SHA-256("") is a constant
   if(TcUtf8(text, data) == 0)
      return "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
   ArrayResize(key, 0);        // hashes take no key
   int n = CryptEncode(CRYPT_HASH_SHA256, data, key, digest);
   string hex = "";
   for(int i = 0; i < n; i++)
      StringAdd(hex, StringFormat("%02x", digest[i]));
   return hex;
  }
//+------------------------------------------------------------------+
//| The state hash carried by every terminal heartbeat.              |
//|                                                                  |
//| Canonical string, as connectors/bridge/hashing.py defines it:    |
//|   for each position, ticket order:  "P:<ticket>:<volume>:<sl>:<tp>;"
//|   then each pending order:  "O:<ticket>:<volume>:<price>:<sl>:<tp>;"
//| volume as %.8g, prices as %.10g (Python's format rules, TcFmtG), |
//| a missing SL/TP as 0; ticket order = shorter first, then bytes,  |
//| which for decimal tickets is numeric order; no other separators. |
//| state_hash = lowercase hex SHA-256 of that string (empty state:  |
//| SHA-256 of "" = e3b0c442...b855).                                |
//+------------------------------------------------------------------+
class CTcStateHash
  {
private:
   long              m_pt[];
   string            m_ps[];
   long              m_ot[];
   string            m_os[];
   int               m_pn;
   int               m_on;

   static void       Insert(long &tickets[], string &pieces[], int &n, const long ticket, const string piece)
     {
      //--- insertion keeps the arrays sorted; terminals list them nearly sorted already
      ArrayResize(tickets, n + 1, 64);
      ArrayResize(pieces, n + 1, 64);
      int i = n;
      while(i > 0 && tickets[i - 1] > ticket)
        {
         tickets[i] = tickets[i - 1];
         pieces[i] = pieces[i - 1];
         i--;
        }
      tickets[i] = ticket;
      pieces[i] = piece;
      n++;
     }

public:
                     CTcStateHash() : m_pn(0), m_on(0) {}
   void              Reset()
     {
      m_pn = 0;
      m_on = 0;
      ArrayResize(m_pt, 0);
      ArrayResize(m_ps, 0);
      ArrayResize(m_ot, 0);
      ArrayResize(m_os, 0);
     }
   void              AddPosition(const long ticket, const double volume, const double sl, const double tp)
     {
      Insert(m_pt, m_ps, m_pn, ticket,
             "P:" + IntegerToString(ticket) + ":" + TcFmtG(volume, 8) + ":" + TcFmtG(sl, 10) + ":" + TcFmtG(tp, 10) + ";");
     }
   void              AddOrder(const long ticket, const double volume, const double sl, const double tp, const double price)
     {
      Insert(m_ot, m_os, m_on, ticket,
             "O:" + IntegerToString(ticket) + ":" + TcFmtG(volume, 8) + ":" + TcFmtG(price, 10) + ":" + TcFmtG(sl, 10) + ":" +
             TcFmtG(tp, 10) + ";");
     }
   string            Canonical() const
     {
      string s = "";
      for(int i = 0; i < m_pn; i++)
         StringAdd(s, m_ps[i]);
      for(int j = 0; j < m_on; j++)
         StringAdd(s, m_os[j]);
      return s;
     }
   string            Hex() const
     {
      return TcSha256Hex(Canonical());
     }
  };
//+------------------------------------------------------------------+
//| Server time <-> UTC.                                             |
//| MetaTrader stamps orders/deals with the trade server's clock     |
//| (often UTC+2/+3). The offset is (server - GMT) rounded to 15 min.|
//| MT5: TimeTradeServer() runs on between quotes (the terminal      |
//| advances it with its own clock), so every pass may measure.      |
//| MT4: TimeCurrent() is the time of the last quote and stands      |
//| still when quotes stop (weekends, thin markets): measured then,  |
//| the offset drifts by the whole gap. So MT4 measures only on a    |
//| fresh tick (TimeCurrent() moved since the previous pass, and     |
//| that pass was recent), keeps the last good offset otherwise      |
//| (also across restarts, in a terminal global variable), and takes |
//| a changed value (DST: a whole hour) once TC_OFFSET_CONFIRM fresh |
//| ticks in a row agree on it.                                      |
//+------------------------------------------------------------------+
long g_tcServerOffset = 0;
bool g_tcServerOffsetKnown = false;

long TcRoundOffset(const long diff_s)
  {
   return (long)MathRound((double)diff_s / 900.0) * 900;
  }

#ifdef __MQL5__
void TcRefreshServerOffset()
  {
   datetime server = TimeTradeServer();
   datetime gmt = TimeGMT();
   if(server == 0 || gmt == 0)
      return;
   g_tcServerOffset = TcRoundOffset((long)server - (long)gmt);
   g_tcServerOffsetKnown = true;
  }
#else
#define TC_FRESH_PASS_MS   1000          // a pass this soon after the previous one sees a fresh tick
#define TC_OFFSET_CONFIRM  3             // fresh ticks in a row that must agree on a new offset
#define TC_OFFSET_MAX_S    (14 * 3600)   // no trade server is further from UTC
datetime g_tcLastQuote = 0;              // TimeCurrent() as of the previous pass
ulong    g_tcLastPassMs = 0;             // TcNowMs() of the previous pass
bool     g_tcOffsetFresh = false;        // the offset was measured on a fresh tick in this run
long     g_tcCandidate = 0;              // a different offset measured on fresh ticks ...
int      g_tcCandidateSeen = 0;          // ... and on how many in a row

string TcOffsetVariable()
  {
   return "tc." + IntegerToString(AccountNumber()) + ".srvoffset";
  }

void TcKeepOffset(const long offset, const string why)
  {
   if(g_tcServerOffsetKnown && offset != g_tcServerOffset)
      PrintFormat("tradecopy: trade server offset %+I64d s -> %+I64d s (%s)", g_tcServerOffset, offset, why);
   g_tcServerOffset = offset;
   g_tcServerOffsetKnown = true;
   if(AccountNumber() != 0)
      GlobalVariableSet(TcOffsetVariable(), (double)offset);   // a restart in a quote gap keeps it
  }

void TcRefreshServerOffset()
  {
   datetime server = TimeCurrent();
   datetime gmt = TimeGMT();
   ulong now = TcNowMs();
   bool fresh = (g_tcLastQuote != 0 && server > g_tcLastQuote &&
                 g_tcLastPassMs != 0 && now - g_tcLastPassMs <= TC_FRESH_PASS_MS);
   if(server > g_tcLastQuote)
      g_tcLastQuote = server;
   g_tcLastPassMs = now;
   if(server == 0 || gmt == 0)
      return;
   long measured = TcRoundOffset((long)server - (long)gmt);
   bool plausible = (measured <= TC_OFFSET_MAX_S && measured >= -TC_OFFSET_MAX_S);
   if(!g_tcServerOffsetKnown)
     {
      //--- before any fresh tick: the last good offset of an earlier run, else this estimate
      //--- (right when quotes flow; replaced by the first fresh tick either way)
      string name = TcOffsetVariable();
      if(AccountNumber() != 0 && GlobalVariableCheck(name))
         g_tcServerOffset = (long)GlobalVariableGet(name);
      else
         g_tcServerOffset = plausible ? measured : 0;
      g_tcServerOffsetKnown = true;
     }
   if(!fresh || !plausible)
      return;   // TimeCurrent() is an old quote's time: keep the last good offset
   if(!g_tcOffsetFresh)
     {
      g_tcOffsetFresh = true;
      g_tcCandidateSeen = 0;
      TcKeepOffset(measured, "first fresh tick");
      return;
     }
   if(measured == g_tcServerOffset)
     {
      g_tcCandidateSeen = 0;
      return;
     }
   //--- a DST switch (or a broker moving its clock): believe it once several fresh ticks agree
   if(g_tcCandidateSeen == 0 || measured != g_tcCandidate)
     {
      g_tcCandidate = measured;
      g_tcCandidateSeen = 0;
     }
   g_tcCandidateSeen++;
   if(g_tcCandidateSeen >= TC_OFFSET_CONFIRM)
     {
      g_tcCandidateSeen = 0;
      TcKeepOffset(measured, "confirmed on fresh ticks: DST or a server clock change");
     }
  }
#endif

long TcServerOffset()
  {
   if(!g_tcServerOffsetKnown)
      TcRefreshServerOffset();
   return g_tcServerOffset;
  }
//--- a server datetime (seconds) as UTC ns; 0 stays 0 ("none")
long TcServerToUtcNs(const datetime server_time)
  {
   if(server_time <= 0)
      return 0;
   return ((long)server_time - TcServerOffset()) * 1000000000;
  }
//--- server milliseconds (DEAL_TIME_MSC, ORDER_TIME_*_MSC) as UTC ns
long TcServerMscToUtcNs(const long server_msc)
  {
   if(server_msc <= 0)
      return 0;
   return (server_msc - TcServerOffset() * 1000) * 1000000;
  }
//--- UTC ns (protocol) as a server datetime (what OrderSend wants for expirations)
datetime TcUtcNsToServer(const long utc_ns)
  {
   if(utc_ns <= 0)
      return 0;
   return (datetime)(utc_ns / 1000000000 + TcServerOffset());
  }
//+------------------------------------------------------------------+
//| A fresh session id: UTC ns and randomness, 24 hex digits.        |
//+------------------------------------------------------------------+
string TcNewSessionId()
  {
   MathSrand((uint)(GetMicrosecondCount() & 0x7FFFFFFF) ^ (uint)GetTickCount());
   return StringFormat("%016I64x%04x%04x", TcUtcNowNs(), MathRand() & 0xFFFF, MathRand() & 0xFFFF);
  }
//--- the error a connector without a session for us answers with (schemas.bridge.NO_SESSION)
#define TC_NO_SESSION "no session: say hello"

//+------------------------------------------------------------------+
//| Comments: follower copies carry the connector's copy comment     |
//| (engine/core/comments.py): "tc.<master>.<ref>", or "tc-<digest>" |
//| forms when that would not fit; letters, digits, "_", "-", "."    |
//| only, at most 31 characters and never cut, so every copy comment |
//| is a key. Keys are compared whole, never by prefix ("tc.m1.555"  |
//| is a prefix of "tc.m1.5550").                                    |
//+------------------------------------------------------------------+
bool TcIsCopyComment(const string comment)
  {
   if(StringLen(comment) <= 3)
      return false;
   string head = StringSubstr(comment, 0, 3);
   return head == "tc." || head == "tc-";
  }
bool TcIsKeyComment(const string comment)
  {
   return TcIsCopyComment(comment) && StringLen(comment) <= TC_COMMENT_MAX;
  }
//--- A closed copy's comment as the broker left it: MT4 appends "[sl]", "[tp]" or " [so]" to
//--- what fits, so the key is the comment itself or the comment followed by one of those marks
//--- (a key never holds "[" or a space, so the mark cannot be part of another key).
bool TcCommentIsKey(const string seen, const string key)
  {
   if(seen == key)
      return true;
   int n = StringLen(key);
   if(StringLen(seen) <= n || StringSubstr(seen, 0, n) != key)
      return false;
   ushort next = StringGetCharacter(seen, n);
   return next == '[' || next == ' ';
  }
string TcClipComment(const string comment)
  {
   if(StringLen(comment) <= TC_COMMENT_MAX)
      return comment;
   return StringSubstr(comment, 0, TC_COMMENT_MAX);
  }
//+------------------------------------------------------------------+
//| Result tail helpers (CommandResult without corr/seq/ts).         |
//+------------------------------------------------------------------+
string TcResultTail(const bool ok, const long retcode, const string reason, const string ticket,
                    const double price, const double volume, const long time_ns)
  {
   CTcJsonWriter w;
   w.Bool("ok", ok);
   w.IntOpt("retcode", retcode);
   w.StrOpt("reason", reason);
   w.StrOpt("ticket", ticket);
   w.NumOpt("price", price);
   w.NumOpt("volume", volume);
   w.IntOpt("time", time_ns);
   return w.Text();
  }
string TcRefuseTail(const string reason)
  {
   return TcResultTail(false, 0, reason, "", 0.0, 0.0, TcUtcNowNs());
  }
//+------------------------------------------------------------------+
//| Protocol order types <-> text                                    |
//| (pending types only: market orders are "side")                   |
//+------------------------------------------------------------------+
#define TC_OT_NONE       -1
#define TC_OT_BUY_LIMIT   0
#define TC_OT_SELL_LIMIT  1
#define TC_OT_BUY_STOP    2
#define TC_OT_SELL_STOP   3

int TcOrderTypeFromText(const string s)
  {
   if(s == "buy_limit")
      return TC_OT_BUY_LIMIT;
   if(s == "sell_limit")
      return TC_OT_SELL_LIMIT;
   if(s == "buy_stop")
      return TC_OT_BUY_STOP;
   if(s == "sell_stop")
      return TC_OT_SELL_STOP;
   return TC_OT_NONE;
  }
string TcOrderTypeText(const int t)
  {
   switch(t)
     {
      case TC_OT_BUY_LIMIT:
         return "buy_limit";
      case TC_OT_SELL_LIMIT:
         return "sell_limit";
      case TC_OT_BUY_STOP:
         return "buy_stop";
      case TC_OT_SELL_STOP:
         return "sell_stop";
     }
   return "";
  }
string TcOrderTypeSide(const int t)
  {
   return (t == TC_OT_BUY_LIMIT || t == TC_OT_BUY_STOP) ? "buy" : "sell";
  }
//+------------------------------------------------------------------+
//| Volume to the symbol's step (the connector already sized it; this|
//| only removes floating-point dust like 0.30000000000000004).      |
//+------------------------------------------------------------------+
double TcNormalizeVolume(const string symbol, const double volume)
  {
   double step = SymbolInfoDouble(symbol, SYMBOL_VOLUME_STEP);
   if(step <= 0.0)
      return NormalizeDouble(volume, 8);
   double v = MathRound(volume / step) * step;
   return NormalizeDouble(v, 8);
  }
//+------------------------------------------------------------------+
//| Ownership of an account's connector link inside one terminal.    |
//|                                                                  |
//| Several programs can serve the same account (MT5: EA + service,  |
//| MT4: EA + loop script, or an EA attached twice). Only one may    |
//| run the account's session: two would each say hello (each hello  |
//| ends the other's session at the connector), report every event   |
//| twice and answer commands twice. Terminal global                 |
//| variables are shared by all programs of a terminal and           |
//| GlobalVariableSetOnCondition is atomic, so they make the lock:   |
//|   tc.<acct>.owner  id of the owner (0 = free)                    |
//|   tc.<acct>.kind   1 = EA, 2 = MT5 service, 3 = MT4 loop script  |
//|   tc.<acct>.beat   owner's GetTickCount() of its last beat       |
//|   tc.<acct>.want   id of a faster program asking for the socket  |
//|   tc.<acct>.wantbeat  its GetTickCount(), refreshed while it waits|
//|                    (a request older than 3 s is void: the asker  |
//|                    died or gave up)                              |
//| A beat older than TC_LOCK_STALE_MS means the owner died (a       |
//| crashed program cannot release), so the lock may be taken over. |
//| It is long on purpose: a synchronous OrderSend can block the     |
//| owner for many seconds on a slow trade server, and stealing the  |
//| lock from a live owner would start the duel described above.     |
//| A program that stops normally releases at once.                  |
//+------------------------------------------------------------------+
#define TC_KIND_EA      1
#define TC_KIND_SERVICE 2
#define TC_KIND_SCRIPT  3
#define TC_LOCK_STALE_MS 60000

class CTcOwnerLock
  {
private:
   string            m_owner;
   string            m_kind;
   string            m_beat;
   string            m_want;
   string            m_wantBeat;
   double            m_id;
   int               m_myKind;
   bool              m_held;
   ulong             m_lastBeat;

   void              Ensure(const string name)
     {
      if(!GlobalVariableCheck(name))
        {
         GlobalVariableTemp(name);     // temporary: gone when the terminal closes
         GlobalVariableSet(name, 0.0);
        }
     }
   bool              OwnerStale()
     {
      double beat = GlobalVariableGet(m_beat);
      uint now = GetTickCount();
      uint age = now - (uint)beat;    // unsigned arithmetic survives the 49-day wrap
      return age > TC_LOCK_STALE_MS;
     }

public:
                     CTcOwnerLock() : m_id(0), m_myKind(0), m_held(false), m_lastBeat(0) {}

   void              Init(const string account, const int kind)
     {
      string base = "tc." + account + ".";
      m_owner = base + "owner";
      m_kind = base + "kind";
      m_beat = base + "beat";
      m_want = base + "want";
      m_wantBeat = base + "wantbeat";
      m_myKind = kind;
      MathSrand((uint)(GetMicrosecondCount() & 0x7FFFFFFF));
      //--- a positive id unique enough among the few programs of one terminal
      m_id = (double)(kind * 100000000 + (int)(GetMicrosecondCount() % 1000000) * 10 + MathRand() % 10 + 1);
      Ensure(m_owner);
      Ensure(m_kind);
      Ensure(m_beat);
      Ensure(m_want);
      Ensure(m_wantBeat);
     }

   bool              Held() const { return m_held; }
   double            Id() const { return m_id; }

   //--- the owner proves it is alive (throttled to 4 writes a second)
   void              Beat(const bool force = false)
     {
      if(!m_held)
         return;
      ulong now = TcNowMs();
      if(!force && now - m_lastBeat < 250)
         return;
      m_lastBeat = now;
      GlobalVariableSet(m_beat, (double)GetTickCount());
     }

   //--- try to take the lock; true when we hold it afterwards
   bool              TryAcquire()
     {
      if(m_held)
         return true;
      Ensure(m_owner);
      double cur = GlobalVariableGet(m_owner);
      bool got = false;
      if(cur == 0.0)
         got = GlobalVariableSetOnCondition(m_owner, m_id, 0.0);
      else
         if(cur != m_id && OwnerStale())
            got = GlobalVariableSetOnCondition(m_owner, m_id, cur);
         else
            if(cur == m_id)
               got = true;
      if(got)
        {
         m_held = true;
         GlobalVariableSet(m_kind, (double)m_myKind);
         Beat(true);
         //--- we asked for it (or nobody did): clear our request
         if(GlobalVariableGet(m_want) == m_id)
            GlobalVariableSet(m_want, 0.0);
        }
      return m_held;
     }

   void              Release()
     {
      if(!m_held)
         return;
      GlobalVariableSetOnCondition(m_owner, 0.0, m_id);
      m_held = false;
     }

   //--- a faster program (service / loop script) asks the current owner to step aside;
   //--- called again and again while waiting, which keeps the request fresh
   void              RequestOwnership()
     {
      GlobalVariableSet(m_want, m_id);
      GlobalVariableSet(m_wantBeat, (double)GetTickCount());
     }
   void              CancelRequest()
     {
      if(GlobalVariableGet(m_want) == m_id)
         GlobalVariableSet(m_want, 0.0);
     }
   //--- another program asked for the socket recently (whether or not we hold it)
   bool              OtherWants()
     {
      double w = GlobalVariableGet(m_want);
      if(w == 0.0 || w == m_id)
         return false;
      uint age = GetTickCount() - (uint)GlobalVariableGet(m_wantBeat);
      return age < 3000;
     }
   //--- true when we hold the socket and should hand it over
   bool              HandoverRequested() { return m_held && OtherWants(); }
   //--- who holds it (0 = nobody alive)
   int               OwnerKind()
     {
      double cur = GlobalVariableGet(m_owner);
      if(cur == 0.0 || OwnerStale())
         return 0;
      return (int)GlobalVariableGet(m_kind);
     }
  };

#endif // TC_PROTOCOL_MQH
//+------------------------------------------------------------------+
