//+------------------------------------------------------------------+
//| TradecopyBridge.mq5 - tradecopy bridge EA for MetaTrader 5       |
//|                                                                  |
//| Attach to any one chart of the account's terminal.               |
//|                                                                  |
//| What it does                                                     |
//|  * master side: turns OnTradeTransaction into TradeEvent frames  |
//|    (TcMt5Events.mqh) the moment the terminal reports them;       |
//|  * follower side: executes the connector's commands with         |
//|    OrderSend (TcMt5Terminal.mqh);                                |
//|  * the session itself (hello/welcome, snapshot, heartbeats with  |
//|    the state hash, seq numbers, idempotency journal) is common   |
//|    code (TcBridge.mqh).                                          |
//|                                                                  |
//| EA and service                                                   |
//|  Only one program per account may own the connector socket       |
//|  (CTcOwnerLock). On its own, this EA owns it and polls it from   |
//|  OnTimer/OnTick - command pickup is then bound by the timer      |
//|  (~10-16 ms on Windows). When TradecopyService runs, the service |
//|  asks for the socket, this EA hands it over (with any events not |
//|  yet sent) and from then on only *forwards* its classified       |
//|  events to the service over a local PUSH socket: services cannot |
//|  receive OnTradeTransaction, EAs cannot block in zmq_poll. If the|
//|  service stops, the EA takes the socket back on its next timer.  |
//+------------------------------------------------------------------+
#property copyright "tradecopy"
#property version   "1.00"
#property description "tradecopy bridge: reports trades and executes copy commands over ZeroMQ."
#property description "Needs libzmq.dll (64-bit) in MQL5\\Libraries and 'Allow DLL imports'."

#include <Tradecopy\TcMt5Events.mqh>

//--- connection
input string       InpEndpoint         = "tcp://127.0.0.1:5555"; // Connector endpoint (ROUTER)
input string       InpToken            = "";                     // Token (sent in hello)
input string       InpServerKey        = "";                     // Connector's CURVE public key (Z85, 40 chars)
input string       InpPublicKey        = "";                     // This terminal's CURVE public key (Z85)
input string       InpSecretKey        = "";                     // This terminal's CURVE secret key (Z85)
input bool         InpPlaintext        = false;                  // Allow no encryption (trusted loopback only)
input string       InpAccountId        = "";                     // Account id ("" = login number)
input ENUM_TC_ROLE InpRole             = TC_ROLE_BOTH;           // Role
//--- execution
input long         InpMagic            = 0;                      // Magic for copies when the command has none
input int          InpDeviationPoints  = 20;                     // Max slippage, points (when the command has none)
input bool         InpDedupByComment   = true;                   // Never open a second copy with the same comment
input int          InpRecoverDays      = 7;                      // History searched for earlier copies (days)
//--- timing
input int          InpHeartbeatMs      = 1000;                   // Heartbeat until the connector's welcome sets it
input int          InpAccountMs        = 1000;                   // Account updates at most every (ms)
input int          InpTimerMs          = 10;                     // Timer (ms): socket polling while this EA owns it
//--- snapshot / service
input string       InpSymbols          = "";                     // Snapshot symbols ("" = Market Watch), comma separated
input string       InpServiceEndpoint  = "";                     // EA -> service endpoint ("" = derived from the login)

CTcMt5Terminal  g_term;
CTcMt5Events    g_events;
CTcBridge       g_bridge;
CTcOwnerLock    g_lock;
//--- forwarding to the service
CTcZmqContext   g_fwdCtx;
CTcSocket       g_fwd;
CTcOutbox       g_fwdOut;
ulong           g_lastPing = 0;

bool            g_ready = false;
long            g_login = 0;
string          g_account = "";
ulong           g_lastComment = 0;

//+------------------------------------------------------------------+
//| The local endpoint the service binds and the EA connects to.     |
//| Derived from the login so that terminals sharing a machine do not|
//| meet by accident; the service also checks the login in every     |
//| forwarded message.                                               |
//+------------------------------------------------------------------+
string ServiceEndpoint()
  {
   if(StringLen(InpServiceEndpoint) > 0)
      return InpServiceEndpoint;
   return "tcp://127.0.0.1:" + IntegerToString(47000 + (int)(g_login % 10000));
  }

bool ValidAccountId(const string id)
  {
   int n = StringLen(id);
   if(n < 1 || n > 64)
      return false;
   for(int i = 0; i < n; i++)
     {
      ushort c = StringGetCharacter(id, i);
      bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
      if(!ok)
         return false;
     }
   return true;
  }

//+------------------------------------------------------------------+
//| Setup waits for the login: at terminal start OnInit can run      |
//| before the account is known.                                     |
//+------------------------------------------------------------------+
bool Setup()
  {
   g_login = AccountInfoInteger(ACCOUNT_LOGIN);
   if(g_login == 0)
      return false;
   g_account = StringLen(InpAccountId) > 0 ? InpAccountId : IntegerToString(g_login);
   TcRefreshServerOffset();
   g_term.Init(InpMagic, InpDeviationPoints, InpSymbols, InpRecoverDays);
   g_events.Init();
   g_lock.Init(IntegerToString(g_login), TC_KIND_EA);
   g_ready = true;
   PrintFormat("tradecopy: EA ready for account %s (login %I64d), role %s", g_account, g_login, EnumToString(InpRole));
   return true;
  }

void StartBridge()
  {
   g_bridge.SetCurve(InpServerKey, InpPublicKey, InpSecretKey, InpPlaintext);
   g_bridge.Start(GetPointer(g_term), InpEndpoint, InpToken, g_account, InpRole, InpHeartbeatMs, InpAccountMs, InpDedupByComment);
   //--- events and results that were waiting for a service that is gone now go out through our
   //--- own session
   string tags[];
   string tails[];
   int n = g_fwdOut.TakeCarried(tags, tails);
   for(int i = 0; i < n; i++)
      g_bridge.EnqueueCarried(tags[i], tails[i]);
  }

//+------------------------------------------------------------------+
//| Forwarding to the service: "<login>\n<tag>\n<tail>" over PUSH,   |
//| with the same no-drop FIFO as the connector link.                |
//+------------------------------------------------------------------+
bool EnsureForwarder()
  {
   if(g_fwd.IsOpen())
      return true;
   //--- immediate=false: frames wait in libzmq for the (re)connection to the service
   if(!g_fwd.Open(g_fwdCtx.Get(), TC_ZMQ_PUSH, "", false))
      return false;
   if(!g_fwd.Connect(ServiceEndpoint()))
     {
      g_fwd.Close();
      return false;
     }
   return true;
  }

void FlushForward()
  {
   ulong now = TcNowMs();
   if(now - g_lastPing >= 1000 && g_fwdOut.Count() == 0)
     {
      g_fwdOut.Push("ping", "");   // lets the service know an EA feeds it events
      g_lastPing = now;
     }
   if(!EnsureForwarder())
      return;
   while(g_fwdOut.Count() > 0)
     {
      string msg = IntegerToString(g_login) + "\n" + g_fwdOut.PeekTag() + "\n" + g_fwdOut.PeekTail();
      int r = g_fwd.SendText(msg);
      if(r == TC_SEND_OK)
        {
         g_fwdOut.Pop();
         continue;
        }
      if(r == TC_SEND_ERROR)
         g_fwd.Close();
      break;   // EAGAIN: retried on the next timer/tick
     }
  }

//+------------------------------------------------------------------+
//| The service asked for the socket: give it, with unsent events    |
//| and results (a command run here but not yet answered is answered |
//| by the service; its journal also knows it).                      |
//+------------------------------------------------------------------+
void HandOver()
  {
   string tags[];
   string tails[];
   int n = g_bridge.TakeCarried(tags, tails);
   g_bridge.Stop();
   g_lock.Release();
   for(int i = 0; i < n; i++)
      g_fwdOut.Push(tags[i], tails[i]);
   PrintFormat("tradecopy: handed the connector socket to TradecopyService (%d unsent events/results forwarded)", n);
   FlushForward();
  }

//+------------------------------------------------------------------+
//| One event from the classifier: to our own session, or to the     |
//| service that owns the socket.                                    |
//+------------------------------------------------------------------+
void Route(const string tail)
  {
   if(!TcRoleReports(InpRole))
      return;
   if(!g_lock.Held())
     {
      int kind = g_lock.OwnerKind();
      if(kind == 0 && !g_lock.OtherWants() && g_lock.TryAcquire())
         StartBridge();
      else
        {
         //--- another TradecopyBridge instance owns this account and reports the same events
         if(g_lock.OwnerKind() == TC_KIND_EA)
            return;
         //--- the service owns the socket, or is about to: forward (PUSH queues until it binds)
         g_fwdOut.Push("event", tail);
         FlushForward();
         return;
        }
     }
   g_bridge.EnqueueEvent(tail);
  }

void Pump()
  {
   if(!g_ready && !Setup())
      return;
   if(g_lock.Held())
     {
      if(g_lock.HandoverRequested())
         HandOver();
      else
        {
         g_bridge.Service();
         g_lock.Beat();
        }
     }
   else
     {
      int kind = g_lock.OwnerKind();
      //--- free and nobody faster waiting for it: take it (e.g. the service stopped)
      if(kind == 0 && !g_lock.OtherWants() && g_lock.TryAcquire())
        {
         StartBridge();
         g_bridge.Service();
        }
      else
         if(kind != TC_KIND_EA)
            FlushForward();
     }
   ShowStatus();
  }

void ShowStatus()
  {
   ulong now = TcNowMs();
   if(now - g_lastComment < 500)
      return;
   g_lastComment = now;
   if(g_lock.Held())
      Comment(g_bridge.Status());
   else
      if(g_lock.OwnerKind() == TC_KIND_SERVICE)
         Comment(StringFormat("tradecopy %s: TradecopyService owns the connector link; this EA forwards trade events to %s "
                              "(%d waiting)", g_account, ServiceEndpoint(), g_fwdOut.Count()));
      else
         Comment(StringFormat("tradecopy %s: another program owns the connector link for this account", g_account));
  }

//+------------------------------------------------------------------+
int OnInit()
  {
   if(!MQLInfoInteger(MQL_DLLS_ALLOWED))
     {
      Alert("tradecopy: enable 'Allow DLL imports' for TradecopyBridge (libzmq.dll)");
      return INIT_FAILED;
     }
   if(StringLen(InpAccountId) > 0 && !ValidAccountId(InpAccountId))
     {
      Alert("tradecopy: account id may only contain letters, digits, '_' and '-' (1-64 characters)");
      return INIT_PARAMETERS_INCORRECT;
     }
   string curve = TcCurveInputsProblem(InpServerKey, InpPublicKey, InpSecretKey, InpPlaintext);
   if(curve != "")
     {
      Alert("tradecopy: " + curve);
      return INIT_PARAMETERS_INCORRECT;
     }
   g_ready = false;
   Setup();   // may wait for the login; Pump() retries
   EventSetMillisecondTimer((int)MathMax(1, InpTimerMs));
   Pump();
   return INIT_SUCCEEDED;
  }

void OnDeinit(const int reason)
  {
   EventKillTimer();
   if(g_lock.Held())
     {
      g_bridge.Stop();
      g_lock.Release();
     }
   if(g_fwdOut.Count() > 0)
      FlushForward();
   g_fwd.Close();
   g_fwdCtx.Term();
   g_ready = false;
   Comment("");
  }

//--- close-by events the classifier held back until their opposite position was known
void RouteHeldEvents()
  {
   if(!g_ready)
      return;
   string events[];
   ArrayResize(events, 0);
   g_events.Poll(events);
   for(int i = 0; i < ArraySize(events); i++)
      Route(events[i]);
  }

void OnTimer()
  {
   RouteHeldEvents();
   Pump();
  }

void OnTick()
  {
   TcRefreshServerOffset();
   Pump();
  }

//+------------------------------------------------------------------+
//| The master side: every account change, classified at once.       |
//+------------------------------------------------------------------+
void OnTradeTransaction(const MqlTradeTransaction &trans, const MqlTradeRequest &request, const MqlTradeResult &result)
  {
   if(!g_ready && !Setup())
      return;
   string events[];
   ArrayResize(events, 0);
   g_events.OnTransaction(trans, events);
   for(int i = 0; i < ArraySize(events); i++)
      Route(events[i]);
  }
//+------------------------------------------------------------------+
