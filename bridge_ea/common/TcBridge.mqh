//+------------------------------------------------------------------+
//| TcBridge.mqh - one terminal's side of the bridge protocol        |
//|                                                                  |
//| CTcBridge owns the DEALER socket and runs the session:           |
//| hello -> welcome/denied, snapshot after every                    |
//| welcome and on snapshot_req, heartbeats with the state hash,     |
//| account updates, sequence numbers and gap detection, and command |
//| execution with the idempotency journal. What is specific to MT4  |
//| or MT5 (reading the account, trading) sits behind CTcTerminal.   |
//|                                                                  |
//| Nothing here blocks except an optional zmq_poll wait (Wait()),   |
//| which the MT5 service and the MT4 loop script use; EAs call      |
//| Service() from OnTimer/OnTick.                                   |
//+------------------------------------------------------------------+
#ifndef TC_BRIDGE_MQH
#define TC_BRIDGE_MQH

#include <Tradecopy\TcProtocol.mqh>
#include <Tradecopy\TcJournal.mqh>

//+------------------------------------------------------------------+
//| What the bridge needs from a terminal (MT4 or MT5 adapter).      |
//| Result "tails" are CommandResult fields without corr/seq/ts.     |
//+------------------------------------------------------------------+
class CTcTerminal
  {
public:
   virtual          ~CTcTerminal() {}
   virtual string    Platform() { return ""; }
   //--- Snapshot fields: corr (when answering snapshot_req), account, symbols, positions, orders
   virtual string    SnapshotTail(const string corr) { return ""; }
   //--- AccountUpdate fields: account, positions
   virtual string    AccountTail() { return ""; }
   //--- cheap value that changes when AccountTail would (balance/equity/margin/count)
   virtual string    AccountFingerprint() { return ""; }
   //--- see CTcStateHash
   virtual string    StateHash() { return ""; }
   //--- the follower ticket a command acts on (cmd.ticket, or found by the copy comment)
   virtual string    ResolveTicket(CTcJsonObject &cmd) { return cmd.Str("ticket"); }
   virtual double    VolumeOf(const string ticket) { return 0.0; }
   //--- run the command; always returns a result tail
   virtual string    Execute(CTcJsonObject &cmd) { return TcRefuseTail("ea: not implemented"); }
   //--- open / pending_place whose copy (same comment + magic) already exists: its result, else ""
   virtual string    FindCopy(CTcJsonObject &cmd) { return ""; }
   //--- a command begun before a crash: its result if the account shows it happened, else ""
   virtual string    Recover(CTcJsonObject &cmd, const string ticket, const double volume_before) { return ""; }
  };

//+------------------------------------------------------------------+
//| Inputs pasted from `tradecopy bridge keys` may carry blanks.     |
//| (StringTrim* modify in place on MQL5, return a copy on MQL4.)    |
//+------------------------------------------------------------------+
string TcTrim(const string text)
  {
#ifdef __MQL5__
   string t = text;
   StringTrimLeft(t);
   StringTrimRight(t);
   return t;
#else
   return StringTrimRight(StringTrimLeft(text));
#endif
  }
//+------------------------------------------------------------------+
//| What is wrong with the CURVE inputs, "" when they can work.      |
//| Checked at OnInit/OnStart and again at Start: a wrong key is a   |
//| setup error to fix, not something to retry every second.         |
//+------------------------------------------------------------------+
string TcCurveInputsProblem(const string server_key, const string public_key, const string secret_key,
                            const bool allow_plaintext)
  {
   string server = TcTrim(server_key), pub = TcTrim(public_key), sec = TcTrim(secret_key);
   if(StringLen(server) == 0)
     {
      if(allow_plaintext)
         return "";
      return "no CURVE server key: set InpServerKey (the connector's public key), InpPublicKey and "
             "InpSecretKey (this terminal's pair, `tradecopy bridge keys`), or InpPlaintext=true on "
             "a trusted loopback only";
     }
   if(!TcZ85KeyValid(server))
      return "InpServerKey is not a CURVE key (40 Z85 characters, as `tradecopy bridge keys` prints it)";
   if(!TcZ85KeyValid(pub) || !TcZ85KeyValid(sec))
      return "InpPublicKey and InpSecretKey must be this terminal's CURVE key pair (40 Z85 characters "
             "each, from `tradecopy bridge keys`)";
   if(pub == server)
      return "InpPublicKey is the connector's key: the terminal needs a key pair of its own";
   if(!TcZmqHasCurve())
      return "this libzmq.dll " + TcZmqVersion() + " has no CURVE (zmq_has(\"curve\") = 0): install a "
             "build with it (vcpkg: zeromq[curve] or zeromq[sodium]; see README)";
   return "";
  }

//--- session states
#define TC_ST_IDLE       0   // not started / stopped
#define TC_ST_NEED_HELLO 1   // a new session: hello goes out on the next flush
#define TC_ST_HELLO_SENT 2   // waiting for welcome/denied; the FIFO is held back
#define TC_ST_ACTIVE     3
#define TC_ST_DENIED     4   // the connector refused us; retried after TC_DENIED_RETRY_MS

#define TC_DENIED_RETRY_MS 30000
//--- a failing zmq_poll returns at once: without a pause the caller's loop spins at 100 % CPU
#define TC_POLL_FAIL_SLEEP_MS  20
#define TC_POLL_FAIL_REOPEN    50      // failures in a row (about a second) before a new socket
#define TC_POLL_FAIL_LOG_MS    60000   // the same errno is logged again at most this often
#define TC_RX_BUFFER       262144

class CTcBridge
  {
private:
   CTcTerminal      *m_term;
   CTcZmqContext     m_ctx;
   CTcSocket         m_sock;
   CTcOutbox         m_out;
   CTcJournal        m_journal;
   CTcJsonObject     m_in;
   uchar             m_rx[];
   //--- configuration
   string            m_endpoint;
   string            m_token;
   string            m_serverKey;    // the connector's CURVE public key (Z85)
   string            m_publicKey;    // this terminal's CURVE key pair (Z85)
   string            m_secretKey;
   bool              m_plaintext;    // no CURVE: only when explicitly allowed
   string            m_account;
   ENUM_TC_ROLE      m_role;
   int               m_hbDefault;
   int               m_acctMs;
   bool              m_dedup;
   //--- session
   int               m_state;
   string            m_session;
   long              m_txSeq;
   long              m_rxSeq;
   int               m_hbMs;
   ulong             m_helloAt;
   ulong             m_lastRx;
   ulong             m_lastHb;
   ulong             m_lastAcct;
   ulong             m_deniedAt;
   ulong             m_lastOpenTry;
   string            m_lastAcctFp;
   string            m_note;
   int               m_connects;     // the <n> of the identity <account>.<session>.<n>
   //--- counters for the status line
   long              m_cmds;
   long              m_dupCmds;
   long              m_events;
   long              m_gaps;
   //--- zmq_poll failures (Wait): counted in a row, logged once per distinct errno
   int               m_pollFails;
   int               m_pollErrno;
   ulong             m_pollLogAt;

   void              Log(const string text)
     {
      m_note = text;
      Print("tradecopy[", m_account, "]: ", text);
     }

   //--- A fresh socket per session with the identity <account>.<session>.<n>: a peer that
   //--- knows only the account id cannot take over our connection (the connector binds the
   //--- identity to the account at the authenticated hello, and uses no ROUTER_HANDOVER).
   bool              OpenSocket()
     {
      m_lastOpenTry = TcNowMs();
      m_sock.Close();
      m_connects++;
      string identity = m_account + "." + m_session + "." + IntegerToString(m_connects);
      if(!m_sock.Open(m_ctx.Get(), TC_ZMQ_DEALER, identity, true))
        {
         Log(StringFormat("cannot create the ZeroMQ socket (errno %d): is libzmq.dll in Libraries and "
                          "\"Allow DLL imports\" on?", m_sock.LastErrno()));
         return false;
        }
      if(StringLen(m_serverKey) > 0)
        {
         if(!m_sock.SetCurveClient(m_serverKey, m_publicKey, m_secretKey))
           {
            Log(StringFormat("CURVE keys refused (errno %d): the server key and this terminal's "
                             "public and secret keys are 40-character Z85 texts from "
                             "`tradecopy bridge keys`", m_sock.LastErrno()));
            m_sock.Close();
            return false;
           }
        }
      else if(!m_plaintext)
        {
         Log("no CURVE server key: set InpServerKey, InpPublicKey and InpSecretKey "
             "(`tradecopy bridge keys`), or InpPlaintext=true on a trusted loopback only");
         m_sock.Close();
         return false;
        }
      if(!m_sock.Connect(m_endpoint))
        {
         Log(StringFormat("cannot connect to %s (errno %d)", m_endpoint, m_sock.LastErrno()));
         m_sock.Close();
         return false;
        }
      return true;
     }

   void              SocketFailed(const string what)
     {
      Log(StringFormat("socket error on %s (errno %d): a new session follows", what, m_sock.LastErrno()));
      m_sock.Close();   // the next Service() opens a new session on a new socket
     }

   //--- zmq_poll said -1: log it without flooding the journal, pause instead of spinning,
   //--- and replace a socket that keeps failing (the next Service() opens a new session)
   void              PollFailed(const int err)
     {
      if(err == TC_EINTR)
         return;   // interrupted by a signal: not a failure, the next round polls again
      m_pollFails++;
      ulong now = TcNowMs();
      if(err != m_pollErrno || now - m_pollLogAt >= TC_POLL_FAIL_LOG_MS)
        {
         Log(StringFormat("zmq_poll failed (errno %d, %d time(s) in a row); pausing %d ms per round",
                          err, m_pollFails, TC_POLL_FAIL_SLEEP_MS));
         m_pollErrno = err;
         m_pollLogAt = now;
        }
      Sleep(TC_POLL_FAIL_SLEEP_MS);
      if(m_pollFails >= TC_POLL_FAIL_REOPEN && m_sock.IsOpen())
        {
         Log(StringFormat("zmq_poll failed %d times in a row (errno %d): a new socket and session follow",
                          m_pollFails, err));
         m_pollFails = 0;
         m_sock.Close();
        }
     }

   //--- new session id, counters reset, and a new socket (the identity names the session)
   void              NewSession(const string why)
     {
      m_session = TcNewSessionId();
      m_txSeq = 0;
      m_rxSeq = 0;
      m_out.KeepForNewSession();
      m_state = TC_ST_NEED_HELLO;
      Log("new session " + m_session + " (" + why + ")");
      OpenSocket();
     }

   bool              SendHello()
     {
      CTcJsonWriter w;
      w.Int("version", TC_PROTOCOL_VERSION);
      w.Str("account", m_account);
      w.Str("token", m_token);
      w.Str("platform", m_term.Platform());
      w.Str("session", m_session);
      w.Str("ea_version", TC_EA_VERSION);
      int r = m_sock.SendText(TcFrame("hello", 1, TcUtcNowNs(), w.Text()));
      if(r == TC_SEND_OK)
        {
         m_txSeq = 1;
         return true;
        }
      if(r == TC_SEND_ERROR)
         SocketFailed("hello");
      return false;   // EAGAIN: not connected yet, try again on the next call
     }

   void              Flush()
     {
      if(!m_sock.IsOpen())
         return;
      if(m_state == TC_ST_NEED_HELLO)
        {
         if(SendHello())
           {
            m_state = TC_ST_HELLO_SENT;
            m_helloAt = TcNowMs();
           }
         return;
        }
      //--- before welcome only hello may go out: the FIFO waits
      if(m_state != TC_ST_ACTIVE)
         return;
      while(m_out.Count() > 0)
        {
         string frame = TcFrame(m_out.PeekTag(), m_txSeq + 1, TcUtcNowNs(), m_out.PeekTail());
         int r = m_sock.SendText(frame);
         if(r == TC_SEND_OK)
           {
            m_txSeq++;
            m_out.Pop();
            continue;
           }
         if(r == TC_SEND_ERROR)
            SocketFailed("send");
         //--- TC_SEND_AGAIN: libzmq cannot take it now. The frame keeps its place and its
         //--- (not yet assigned) sequence number; the next tick/loop tries again.
         break;
        }
     }

   void              PushError(const string reason, const long ref_seq)
     {
      CTcJsonWriter w;
      w.Str("reason", reason);
      w.IntOpt("ref_seq", ref_seq);
      m_out.Push("error", w.Text());
     }

   void              PushSnapshot(const string corr)
     {
      m_out.Push("snapshot", m_term.SnapshotTail(corr));
     }

   void              HandleCommand()
     {
      string corr = m_in.Str("corr");
      if(StringLen(corr) == 0)
        {
         PushError("cmd without corr", m_in.Int("seq"));
         return;
        }
      m_cmds++;
      string key = TcJsonEscape(corr);
      string jtail = "", jop = "", jticket = "";
      double jvol = 0.0;
      int known = m_journal.Lookup(key, jtail, jop, jticket, jvol);
      if(known == TC_J_RESULT)
        {
         //--- a repeated corr: the first result again, no second trade
         m_dupCmds++;
         m_out.Push("result", jtail);
         Log("repeated corr " + corr + ": answered with the first result");
         return;
        }
      string tail = "";
      if(!TcRoleExecutes(m_role))
         tail = TcRefuseTail("ea: this account is configured as master only");
      else
        {
         if(known == TC_J_BEGUN)
           {
            //--- begun before a crash: did it reach the broker?
            tail = m_term.Recover(m_in, jticket, jvol);
            Log("corr " + corr + " was in doubt after a restart: " + (tail == "" ? "not executed, executing now" : "found executed"));
           }
         if(tail == "" && m_dedup)
            tail = m_term.FindCopy(m_in);
         if(tail == "")
           {
            string ticket = m_term.ResolveTicket(m_in);
            m_journal.Begin(key, m_in.Str("op"), ticket, m_term.VolumeOf(ticket));
            tail = m_term.Execute(m_in);
           }
        }
      string full = "\"corr\":\"" + key + "\"," + tail;
      m_journal.Result(key, full);
      m_out.Push("result", full);
      Flush();   // the result leaves now, not after the rest of the batch
     }

   void              HandleFrame(const string text)
     {
      if(!m_in.Parse(text))
        {
         Log("malformed frame from the connector: " + m_in.Error());
         if(m_state == TC_ST_ACTIVE)
            PushError("malformed frame: " + m_in.Error(), 0);
         return;
        }
      string t = m_in.Str("t");
      long seq = m_in.Int("seq", 0);
      m_lastRx = TcNowMs();

      //--- outside any session's numbering (a restarted connector): whatever its seq, say hello
      if(t == "error" && m_in.Str("reason") == TC_NO_SESSION)
        {
         if(m_state == TC_ST_ACTIVE)
            NewSession("the connector has no session for us");
         return;   // while hello is on its way it answers a stale frame: nothing to do
        }

      if(m_state == TC_ST_HELLO_SENT)
        {
         if(t == "welcome")
           {
            m_rxSeq = seq;
            m_state = TC_ST_ACTIVE;
            //--- omitted means the protocol default (msgspec omits defaults), not our input
            m_hbMs = (int)m_in.Int("heartbeat_ms", 1000);
            if(m_hbMs < 50)
               m_hbMs = 50;
            if(m_in.Int("version", TC_PROTOCOL_VERSION) != TC_PROTOCOL_VERSION)
               Log(StringFormat("connector speaks protocol version %d, this EA %d",
                                m_in.Int("version"), TC_PROTOCOL_VERSION));
            m_lastHb = 0;
            m_lastAcct = 0;
            //--- frames held during the handshake (events/results) go first, then the snapshot
            PushSnapshot("");
            Log(StringFormat("welcome: session active, heartbeat %d ms, %d frames queued", m_hbMs, m_out.Count()));
           }
         else
            if(t == "denied")
              {
               m_state = TC_ST_DENIED;
               m_deniedAt = TcNowMs();
               Log("denied by the connector: " + m_in.Str("reason") + StringFormat(" (retry in %d s)", TC_DENIED_RETRY_MS / 1000));
              }
         else
            if(t == "error")
               Log("connector error during the handshake: " + m_in.Str("reason"));
         //--- anything else belongs to an older session: ignore
         return;
        }
      if(m_state != TC_ST_ACTIVE)
         return;

      //--- sequence: a repeat is a duplicate (ignored), a jump means frames were lost
      if(seq <= m_rxSeq)
         return;
      if(seq > m_rxSeq + 1)
        {
         m_gaps++;
         PushError(StringFormat("seq gap: expected %I64d, got %I64d", m_rxSeq + 1, seq), seq);
        }
      m_rxSeq = seq;

      if(t == "cmd")
         HandleCommand();
      else
         if(t == "snapshot_req")
            PushSnapshot(m_in.Str("corr"));
         else
            if(t == "hb")
              {
               // liveness only (m_lastRx)
              }
            else
               if(t == "error")
                 {
                  Log("connector reports an error: " + m_in.Str("reason") +
                      StringFormat(" (ref_seq %I64d)", m_in.Int("ref_seq")));
                 }
               else
                  if(t == "denied")
                    {
                     m_state = TC_ST_DENIED;
                     m_deniedAt = TcNowMs();
                     Log("denied by the connector: " + m_in.Str("reason"));
                    }
                  else
                     if(t != "welcome")
                        PushError("unknown frame type: " + t, seq);
     }

   void              ReceiveAll()
     {
      for(int k = 0; k < 256 && m_sock.IsOpen(); k++)
        {
         int n = m_sock.Recv(m_rx);
         if(n == TC_RECV_NONE)
            break;
         if(n == TC_RECV_ERROR)
           {
            SocketFailed("recv");
            break;
           }
         if(n == TC_RECV_TOO_BIG)
           {
            if(m_state == TC_ST_ACTIVE)
               PushError("frame too large", 0);
            continue;
           }
         HandleFrame(CharArrayToString(m_rx, 0, n, CP_UTF8));
        }
     }

   void              Timers()
     {
      ulong now = TcNowMs();
      if(m_state == TC_ST_HELLO_SENT)
        {
         if(now - m_helloAt > (ulong)MathMax(5000, 3 * m_hbDefault))
            //--- under CURVE a refused key gets no answer at all: say where to look
            NewSession(StringLen(m_serverKey) > 0 ?
                       "no welcome within the timeout: is InpServerKey this connector's public key, "
                       "and InpPublicKey listed as this account's curve_public_key?" :
                       "no welcome within the timeout");
        }
      else
         if(m_state == TC_ST_DENIED)
           {
            if(now - m_deniedAt >= TC_DENIED_RETRY_MS)
               NewSession("retry after denied");
           }
         else
            if(m_state == TC_ST_ACTIVE)
              {
               //--- the connector heartbeats every heartbeat_ms; three missed = gone
               if(now - m_lastRx > (ulong)(3 * m_hbMs + 1000))
                 {
                  NewSession("connector silent");
                  return;
                 }
               //--- our heartbeat; pointless behind a backlog (it would only add to it)
               if(now - m_lastHb >= (ulong)m_hbMs && m_out.Count() == 0)
                 {
                  m_lastHb = now;
                  CTcJsonWriter w;
                  w.Str("state_hash", m_term.StateHash());
                  m_out.Push("hb", w.Text());
                 }
               if(m_acctMs > 0 && now - m_lastAcct >= (ulong)m_acctMs && m_out.Count() < 100)
                 {
                  m_lastAcct = now;
                  string fp = m_term.AccountFingerprint();
                  if(fp != m_lastAcctFp)
                    {
                     m_lastAcctFp = fp;
                     m_out.Push("account", m_term.AccountTail());
                    }
                 }
              }
     }

public:
                     CTcBridge() : m_term(NULL), m_plaintext(false), m_role(TC_ROLE_BOTH), m_hbDefault(1000),
                     m_acctMs(1000), m_dedup(true), m_state(TC_ST_IDLE), m_txSeq(0), m_rxSeq(0), m_hbMs(1000),
                     m_helloAt(0), m_lastRx(0), m_lastHb(0), m_lastAcct(0), m_deniedAt(0),
                     m_lastOpenTry(0), m_connects(0), m_cmds(0), m_dupCmds(0), m_events(0), m_gaps(0),
                     m_pollFails(0), m_pollErrno(0), m_pollLogAt(0) {}
                    ~CTcBridge() { Stop(); }

   //--- CURVE keys (Z85): the connector's public key and this terminal's key pair. Call before
   //--- Start. Without a server key the bridge refuses to connect unless plaintext is allowed.
   void              SetCurve(const string server_key, const string public_key, const string secret_key,
                              const bool allow_plaintext)
     {
      m_serverKey = TcTrim(server_key);
      m_publicKey = TcTrim(public_key);
      m_secretKey = TcTrim(secret_key);
      m_plaintext = allow_plaintext;
     }

   //--- account: the protocol account id (hello.account, and the first part of the identity)
   bool              Start(CTcTerminal *term, const string endpoint, const string token, const string account,
                           const ENUM_TC_ROLE role, const int heartbeat_ms, const int account_ms, const bool dedup)
     {
      m_term = term;
      m_endpoint = endpoint;
      m_token = token;
      m_account = account;
      m_role = role;
      m_hbDefault = (int)MathMax(50, heartbeat_ms);
      m_hbMs = m_hbDefault;
      m_acctMs = account_ms;
      m_dedup = dedup;
      //--- a setup error stays idle with one clear line, instead of a failed socket every second
      string problem = TcCurveInputsProblem(m_serverKey, m_publicKey, m_secretKey, m_plaintext);
      if(problem != "")
        {
         m_state = TC_ST_IDLE;
         Log("not connecting: " + problem);
         return false;
        }
      ArrayResize(m_rx, TC_RX_BUFFER);
      m_journal.Open(account);
      Log("libzmq " + TcZmqVersion() + ", connecting to " + endpoint +
          (StringLen(m_serverKey) > 0 ? " (CURVE)" : " (PLAINTEXT: no encryption, InpPlaintext)"));
      NewSession("start");
      return true;
     }

   void              Stop()
     {
      if(m_state == TC_ST_IDLE && !m_sock.IsOpen())
         return;
      if(m_state == TC_ST_ACTIVE)
         Flush();              // best effort: whatever libzmq takes now
      m_sock.Close();
      m_ctx.Term();
      m_journal.Close();
      m_state = TC_ST_IDLE;
     }

   //--- one non-blocking round: reconnect if needed, read, run timers, write
   void              Service()
     {
      if(m_state == TC_ST_IDLE)
         return;
      if(!m_sock.IsOpen())
        {
         if(TcNowMs() - m_lastOpenTry < 1000)
            return;
         NewSession("reconnect");
         if(!m_sock.IsOpen())
            return;
        }
      ReceiveAll();
      Timers();
      Flush();
     }

   //--- block in zmq_poll until our socket or `extra` (0 = none) is readable, or timeout_ms;
   //--- then one Service() round. A frame wakes the poll at once: the timeout only bounds idling.
   void              Wait(const int timeout_ms, const TC_PTR extra, bool &extra_ready)
     {
      bool mine = false;
      extra_ready = false;
      //--- with a backlog, do not sleep long: EAGAIN is retried on every round
      int t = (m_out.Count() > 0) ? (int)MathMin(timeout_ms, 1) : timeout_ms;
      int rc = TcPoll(m_sock.IsOpen() ? m_sock.Handle() : 0, extra, t, mine, extra_ready);
      //--- zmq_errno() right away: it is the errno of the last libzmq call on this thread
      if(rc < 0)
         PollFailed(zmq_errno());
      else
         m_pollFails = 0;
      Service();
     }

   //--- a master trade event (fields of a TradeEvent frame); sent at once when possible
   void              EnqueueEvent(const string tail)
     {
      m_events++;
      m_out.Push("event", tail);
      Flush();
     }

   //--- send whatever results/snapshots a command produced without waiting for the next round
   void              FlushNow() { Flush(); }

   //--- hand the unsent events and results to another program (EA <-> MT5 service handover)
   int               TakeCarried(string &tags[], string &tails[]) { return m_out.TakeCarried(tags, tails); }

   //--- a frame another program of this account handed over (its TakeCarried): sent in our session
   void              EnqueueCarried(const string tag, const string tail)
     {
      if(tag == "event")
        {
         EnqueueEvent(tail);
         return;
        }
      if(!TcOutboxCarries(tag))
         return;   // stale in any other session
      m_out.Push(tag, tail);
      Flush();
     }

   bool              IsActive() const { return m_state == TC_ST_ACTIVE; }
   int               Backlog() const { return m_out.Count(); }

   string            Status() const
     {
      string st = "idle";
      switch(m_state)
        {
         case TC_ST_NEED_HELLO:
            st = "connecting";
            break;
         case TC_ST_HELLO_SENT:
            st = "hello sent";
            break;
         case TC_ST_ACTIVE:
            st = "active";
            break;
         case TC_ST_DENIED:
            st = "DENIED";
            break;
        }
      return StringFormat("tradecopy %s | %s | %s | session %s | out seq %I64d, in seq %I64d | backlog %d | "
                          "events %I64d | cmds %I64d (repeats %I64d) | gaps %I64d\n%s",
                          m_account, m_endpoint, st, m_session, m_txSeq, m_rxSeq, m_out.Count(),
                          m_events, m_cmds, m_dupCmds, m_gaps, m_note);
     }
  };

#endif // TC_BRIDGE_MQH
//+------------------------------------------------------------------+
